"""Decode speed and bandwidth utilisation of a real-width slice of GLM-4.6: the real hidden
size, heads, experts and vocabulary, fewer layers (3 dense + the rest MoE, as the model
starts), random weights, through the serving engine (PagedEngine: a scan of decode steps per
call over the KV pages of the running rows; the prompts are computed first, untimed).

  python3 benchmarks/bench_slice.py --layers 4 --batches 1,64                 # accelerator
  python3 benchmarks/bench_slice.py --layers 4 --batches 1,64 --speculative_tokens 1,3
  python3 benchmarks/bench_slice.py --layers 2 --experts 16 --context 64 \\
      --batches 1 --dtype float32                                             # CPU smoke run

Bandwidth utilisation = bytes one decode step must read (roofline.active_bytes: the
experts the batch routes to at most, attention, norms, routers, the lm_head, the KV read)
/ step time / the device's measured copy bandwidth (read + write of a large array).
"""

import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PRESET = flags.DEFINE_enum('preset', 'glm-4.6', ['glm-4.6', 'glm-4.5', 'glm-4.5-air'],
                            'published config to slice')
_LAYERS = flags.DEFINE_integer('layers', 4, 'decoder layers (the first min(3, layers - 1) '
                               'dense)')
_EXPERTS = flags.DEFINE_integer('experts', 0, 'routed experts (0: the real number)')
_BATCHES = flags.DEFINE_string('batches', '1,64', 'batch sizes')
_CONTEXT = flags.DEFINE_integer('context', 1024, 'prompt tokens per row before decoding')
_STEPS = flags.DEFINE_integer('steps', 32, 'decode steps per timed call')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed calls per figure')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'weights dtype')
_SPEC = flags.DEFINE_string('speculative_tokens', '', 'also, for each k given (e.g. 1,3): '
                            'a decode call of verify steps (k + 1 tokens per row, k MTP '
                            'drafts) against a plain one, per step, on the same engine')


def main(argv):
    del argv
    from roofline import active_bytes, memory_bandwidth

    from glmjax import GlmConfig
    from glmjax.model import init_params
    from glmjax.serving import paged_engine
    from glmjax.serving.paged_engine import PagedEngine

    base = GlmConfig.preset(_PRESET.value)
    L = _LAYERS.value
    cfg = dataclasses.replace(
        base, num_hidden_layers=L, first_k_dense_replace=min(base.first_k_dense_replace, L - 1),
        n_routed_experts=_EXPERTS.value or base.n_routed_experts, eos_token_ids=())
    dtype = jnp.dtype(_DTYPE.value)
    ks = [int(k) for k in _SPEC.value.split(',') if k]
    params = init_params(cfg, dtype, mtp=bool(ks))
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    bw = memory_bandwidth()
    print(f'{_PRESET.value} slice: {L} layers ({cfg.first_k_dense_replace} dense), '
          f'D={cfg.hidden_size}, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, '
          f'vocab {cfg.vocab_size}; {size / 1e9:.1f} GB of {dtype.name} weights on '
          f'{jax.devices()[0].device_kind}; copy bandwidth {bw / 1e9:.0f} GB/s')
    T, S, R = _CONTEXT.value, _STEPS.value, _REPEATS.value
    print(f'context {T} tokens per row; {S} decode steps per call; median of {R} calls '
          '(min-max)')
    print(f'{"batch":>5} | {"ms/step":>18} | {"tokens/s":>10} | {"MB read/step":>12} | '
          f'{"GB/s":>7} | utilisation')
    for B in [int(b) for b in _BATCHES.value.split(',')]:
        engine = PagedEngine(cfg, params, max_batch=B, max_seq_len=T + S * (R + 2),
                             steps_per_call=S, max_num_batched_tokens=max(B, 2048))
        # The pool's default size: from the device's memory where it reports it.
        print(f'batch {B}: KV pool of {engine.num_pages:,} pages of {engine.page_size} tokens; '
              f'device memory {paged_engine.device_memory(jax.devices()[:1])}')
        fill(engine, cfg, B, T)
        jax.block_until_ready(engine.generate())  # compile the decode call
        times = []
        for _ in range(R):
            start = time.perf_counter()
            jax.block_until_ready(engine.generate())
            times.append((time.perf_counter() - start) / S)
        step, lo, hi = statistics.median(times), min(times), max(times)
        need = active_bytes(cfg, params, B, T + S * (R + 1) // 2)
        print(f'{B:>5} | {step * 1e3:7.2f} ({lo * 1e3:.2f}-{hi * 1e3:.2f}) | '
              f'{B / step:10.1f} | {need / 1e6:12.0f} | {need / step / 1e9:7.0f} | '
              f'{need / step / bw:.0%}')
        del engine
        for k in ks:
            verify_cost(cfg, params, B, k, T, S, R)


def fill(engine, cfg, B: int, T: int) -> None:
    """B rows of T random prompt tokens each, computed (in mixed steps), decoding on."""
    from glmjax.serving.engine import SlotSettings

    rng = np.random.RandomState(B)
    for slot in range(B):
        prompt = rng.randint(0, cfg.vocab_size, T).tolist()
        engine.insert(engine.prefill(prompt), slot, SlotSettings(max_new=1 << 30))
    while any(f is not None for f in engine._filling):
        jax.block_until_ready(engine.generate())


def verify_cost(cfg, params, B: int, k: int, T: int, S: int, R: int) -> None:
    """Per step, a speculative decode call (each step verifies k + 1 tokens per row and
    drafts k) against a plain one (1 token per row), both from one engine of B rows at T
    tokens of context: the engine's own switch (speculative_max_batch) picks the kind. In
    each round the second of two calls of a kind is timed, so the speculative one is not
    the first after plain calls (that one also redrafts). Random weights accept almost no
    draft: this is the cost of a verify step, not a speed-up."""
    from glmjax.serving.paged_engine import PagedEngine

    engine = PagedEngine(cfg, params, max_batch=B, max_seq_len=T + 4 * S * (k + 1) * (R + 2),
                         steps_per_call=S, max_num_batched_tokens=max(B, 2048),
                         speculative_tokens=k, speculative_max_batch=B)
    fill(engine, cfg, B, T)
    times = {'verify': [], 'plain': []}
    for _ in range(R + 1):  # the first round compiles
        for kind, cap in (('verify', B), ('plain', 0)):
            engine.spec_max_batch = cap  # a call of more sequences than this is plain
            jax.block_until_ready(engine.generate())
            start = time.perf_counter()
            jax.block_until_ready(engine.generate())
            times[kind].append((time.perf_counter() - start) / S)
    verify, plain = (statistics.median(times[kind][1:]) for kind in ('verify', 'plain'))
    print(f'batch {B}, k = {k}: a verify step ({k + 1} tokens per row, {k} draft{"s" * (k > 1)}) '
          f'{verify * 1e3:.2f} ms, a plain step {plain * 1e3:.2f} ms: {verify / plain:.2f}x; '
          f'{engine.metrics()["spec_decode_num_accepted_tokens"]} drafts accepted')
    del engine


if __name__ == '__main__':
    app.run(main)
