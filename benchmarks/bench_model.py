"""Model throughput side by side with transformers, and bandwidth utilisation.

  .venv/bin/python benchmarks/bench_model.py --config tiny --batches 1,8,32
  .venv/bin/python benchmarks/bench_model.py --config small --batches 1,8,32
  .venv/bin/python benchmarks/bench_model.py --config small --bandwidth_only

Both engines get the same random weights (transformers builds the model, glmjax loads its
save), the same prompts and greedy decoding of --new_tokens tokens. Prefill is timed as one
forward over the prompts, decode as the remaining steps. Each figure is the median of
--repeats runs, with min and max.
"""

import dataclasses
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, __file__.rsplit('/', 2)[0] + '/tests')
sys.path.insert(0, __file__.rsplit('/', 1)[0])

_CONFIG = flags.DEFINE_enum('config', 'tiny', ['tiny', 'small'], 'model size')
_BATCHES = flags.DEFINE_string('batches', '1,8,32', 'batch sizes')
_PROMPT = flags.DEFINE_integer('prompt_len', 128, 'prompt tokens per row')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'generated tokens per row')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'runs per figure')
_BW_ONLY = flags.DEFINE_bool('bandwidth_only', False, 'only the bandwidth figures')


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def fmt(tokens, t):
    med, lo, hi = t
    return f'{tokens / med:9.1f} ({tokens / hi:.1f}-{tokens / lo:.1f})'


def main(argv):
    del argv
    import torch
    from configs import CONFIGS
    from roofline import active_bytes, matmul_flops, memory_bandwidth, prefill_flops

    import hf_tiny
    from glmjax import GlmConfig, init_cache, load_hf, prefill
    from glmjax.generate import _decode_loop, _sample
    from glmjax.sampling import SamplingParams

    torch.set_num_threads(2)  # the same two cores XLA:CPU uses
    model = hf_tiny.make_model(seed=0, **CONFIGS[_CONFIG.value])
    with tempfile.TemporaryDirectory() as d:
        hf_tiny.save(model, d)
        cfg = GlmConfig.from_hf(d)
        params = load_hf(d, cfg, dtype=jnp.float32)
    cfg = dataclasses.replace(cfg, eos_token_ids=())
    T, N, R = _PROMPT.value, _NEW.value, _REPEATS.value
    bw, flops = memory_bandwidth(), matmul_flops()
    print(f'config {_CONFIG.value}: {cfg.num_hidden_layers} layers, D={cfg.hidden_size}, '
          f'{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; '
          f'prompt {T}, new tokens {N}; copy bandwidth {bw / 1e9:.1f} GB/s; '
          f'fp32 matmul {flops / 1e9:.0f} GFLOP/s; '
          f'backend {jax.default_backend()}, {R} runs each (median, min-max)')

    def glm_run(B):
        prompts = jnp.asarray(np.random.RandomState(B).randint(0, cfg.vocab_size, (B, T)),
                              jnp.int32)
        lengths = jnp.full((B,), T, jnp.int32)
        sampling = SamplingParams.make(B)
        state = {}

        def do_prefill():
            cache = init_cache(cfg, B, T + N, jnp.float32)
            logits, cache = prefill(cfg, params, prompts, lengths, cache)
            state['first'] = jax.jit(_sample)(logits, sampling, 0)
            state['cache'] = cache
            state['first'].block_until_ready()

        def do_decode():
            out, cache = _decode_loop(cfg, params, state['first'], state['cache'], N - 1,
                                      sampling)
            out.block_until_ready()
            do_prefill()  # decode donated the cache; refill outside the decode timing

        do_prefill(), do_decode()  # compile
        pre = timed(do_prefill, R)
        dec_times = []
        for _ in range(R):
            start = time.perf_counter()
            out, _ = _decode_loop(cfg, params, state['first'], state['cache'], N - 1,
                                  sampling)
            out.block_until_ready()
            dec_times.append(time.perf_counter() - start)
            do_prefill()
        dec = (statistics.median(dec_times), min(dec_times), max(dec_times))
        return pre, dec

    def hf_run(B):
        prompts = torch.from_numpy(np.random.RandomState(B).randint(0, cfg.vocab_size, (B, T)))
        with torch.no_grad():
            pre = timed(lambda: model(prompts), R)
            full = timed(lambda: model.generate(prompts, max_new_tokens=N, min_new_tokens=N,
                                                do_sample=False, eos_token_id=None,
                                                pad_token_id=0), R)
        dec = tuple(f - pre[0] for f in full)  # generate = prefill + decode
        return pre, dec

    if _BW_ONLY.value:
        _, dec = glm_run(1)
        step = dec[0] / (N - 1)
        need = active_bytes(cfg, params, 1, T + N // 2)
        print(f'batch-1 decode: {step * 1e3:.2f} ms/step, {need / 1e6:.0f} MB read per step, '
              f'{need / step / 1e9:.1f} GB/s = {need / step / bw:.0%} of copy bandwidth')
        return
    print(f'{"batch":>5} | {"prefill tok/s glmjax":>24} | {"transformers":>24} | ratio | '
          f'{"decode tok/s glmjax":>24} | {"transformers":>24} | ratio')
    for B in [int(b) for b in _BATCHES.value.split(',')]:
        (gp, gd), (hp, hd) = glm_run(B), hf_run(B)
        print(f'{B:>5} | {fmt(B * T, gp):>24} | {fmt(B * T, hp):>24} | {hp[0] / gp[0]:5.1f} | '
              f'{fmt(B * (N - 1), gd):>24} | {fmt(B * (N - 1), hd):>24} | '
              f'{hd[0] / gd[0]:5.1f}')
        used = prefill_flops(cfg, params, B, T) / gp[0]
        print(f'      prefill runs {used / 1e9:.0f} GFLOP/s: {used / flops:.0%} of matmul FLOP/s')
        if B == 1:
            step = gd[0] / (N - 1)
            need = active_bytes(cfg, params, 1, T + N // 2)
            print(f'      batch-1 decode reads {need / 1e6:.1f} MB/step: '
                  f'{need / step / bw:.0%} of copy bandwidth')


if __name__ == '__main__':
    app.run(main)
