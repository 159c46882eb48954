"""Where one decode step's (or prefill's) time goes: a profile of the jitted `decode` or
`prefill` of a benchmark config, summed per source operation (the einsum, the parameter, or
the MoE branch it came from).

  .venv/bin/python benchmarks/profile_step.py --config small --batch 32
  .venv/bin/python benchmarks/profile_step.py --config small --batch 1 --call prefill

Runs --steps profiled steps after warming up; prints ms per step for each operation, summed
over the XLA:CPU worker threads (so the total can exceed the step's wall time), and the
compiled program's copies and transposes of large arrays, which a good step has none of.
"""

import collections
import pathlib
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, __file__.rsplit('/', 2)[0] + '/tests')
sys.path.insert(0, __file__.rsplit('/', 1)[0])

_CONFIG = flags.DEFINE_enum('config', 'small', ['tiny', 'small'], 'model size')
_CALL = flags.DEFINE_enum('call', 'decode', ['decode', 'prefill'], 'what is profiled')
_BATCH = flags.DEFINE_integer('batch', 32, 'rows (prompts of 128 tokens for prefill)')
_KV = flags.DEFINE_integer('kv', 256, 'cache positions (the first 128 filled by a prefill)')
_STEPS = flags.DEFINE_integer('steps', 3, 'profiled steps')
_TOP = flags.DEFINE_integer('top', 25, 'operations printed')


def main(argv):
    del argv
    from configs import CONFIGS
    from roofline import median_time

    import hf_tiny
    from glmjax import GlmConfig, init_cache, init_params
    from glmjax.inference import decode, prefill

    cfg = GlmConfig.from_dict(hf_tiny.hf_config(**CONFIGS[_CONFIG.value]).to_dict())
    params = init_params(cfg, jnp.float32, seed=0)
    B, T = _BATCH.value, 128
    prompts = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)), jnp.int32)
    cache = init_cache(cfg, B, _KV.value, jnp.float32)
    logits, cache = prefill(cfg, params, prompts, jnp.full((B,), T, jnp.int32), cache)
    tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    state = {'cache': cache}
    lengths = jnp.full((B,), T, jnp.int32)

    def step():
        if _CALL.value == 'decode':
            logits, state['cache'] = decode(cfg, params, tokens, state['cache'])
        else:  # prefill donates its cache: a fresh one each call
            logits, _ = prefill(cfg, params, prompts, lengths,
                                init_cache(cfg, B, _KV.value, jnp.float32))
        logits.block_until_ready()

    step()
    print(f'{_CONFIG.value} {_CALL.value}, batch {B}: {median_time(step, 5) * 1e3:.1f} ms '
          f'(median of 5)')
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(_STEPS.value):
            step()
        jax.profiler.stop_trace()
        trace = next(pathlib.Path(d).rglob('*.xplane.pb'))
        data = jax.profiler.ProfileData.from_file(str(trace))

    if _CALL.value == 'decode':
        compiled = decode.lower(cfg, params, tokens, state['cache'])
    else:
        compiled = prefill.lower(cfg, params, prompts, lengths, state['cache'])
    compiled = compiled.compile().as_text()
    source = {}  # HLO instruction -> the operation it came from
    for line in compiled.splitlines():
        m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', line)
        if m:
            source.setdefault(m.group(1), re.sub(r'\[\\?\'?\d+\\?\'?\]', '[N]', m.group(2)))
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if 'XLAEigen' not in line.name:  # the worker threads that run the program
                continue
            for event in line.events:
                if event.name in source:
                    per_op[source[event.name]] += event.duration_ns
    total = sum(per_op.values()) / _STEPS.value / 1e6
    print(f'ms per step, summed over worker threads (total {total:.1f}):')
    for op, ns in per_op.most_common(_TOP.value):
        print(f'{ns / _STEPS.value / 1e6:9.2f}  {op}')
    big = [line.strip()[:160] for line in compiled.splitlines()
           if re.search(r'= f32\[[\d,]+\]\S* (copy|transpose)\(', line)
           and np.prod([int(n) for n in re.search(r'f32\[([\d,]+)\]', line).group(1).split(',')])
           >= 1 << 20]
    print(f'copies/transposes of >= 1M elements in the program: {len(big)}')
    for line in big[:10]:
        print('  ' + line)


if __name__ == '__main__':
    app.run(main)
