"""Compiled temporary memory of one 512-token prefill chunk at 32K tokens of context: the
paged engine's forward (online softmax over key blocks) against the contiguous-cache prefill
(fp32 scores [heads, chunk, cache length]), on the tiny GLM-4.6-shaped model, fp32.

    .venv/bin/python benchmarks/prefill_memory.py [--context 32768] [--chunk 512]

Reads XLA's memory analysis of the compiled programs (abstract shapes: nothing runs)."""

import argparse

import jax
import jax.numpy as jnp

from glmjax.cache import cache_shapes
from glmjax.demo import tiny_glm46
from glmjax.inference import prefill
from glmjax.model import abstract_params
from glmjax.paged_inference import init_pages, paged_forward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--context', type=int, default=32768)
    parser.add_argument('--chunk', type=int, default=512)
    parser.add_argument('--page_size', type=int, default=16)
    a = parser.parse_args()
    cfg = tiny_glm46()
    cfg = cfg.__class__(**{**cfg.__dict__, 'max_position_embeddings': a.context})
    params = abstract_params(cfg, jnp.float32)
    S = jax.ShapeDtypeStruct
    T, C, L = a.chunk, a.context, a.page_size
    pages = jax.eval_shape(lambda: init_pages(cfg, C // L + 1, L, jnp.float32))
    paged = jax.jit(paged_forward, static_argnums=0).lower(
        cfg, params, S((T,), jnp.int32), S((T,), jnp.int32), pages, S((1,), jnp.int32),
        S((1, C // L), jnp.int32), S((2,), jnp.int32), S((1,), jnp.int32)).compile()
    cache = cache_shapes(cfg, 1, C, jnp.float32)
    dense = jax.jit(prefill, static_argnums=0).lower(
        cfg, params, S((1, T), jnp.int32), S((1,), jnp.int32), cache).compile()
    scores = cfg.num_attention_heads * T * C * 4
    p, d = (x.memory_analysis().temp_size_in_bytes for x in (paged, dense))
    print(f'tiny model, {T}-token chunk at {C} tokens of context, fp32: one layer\'s fp32 '
          f'score matrix [heads, chunk, context] = {scores / 2**20:.0f} MiB')
    print(f'  contiguous prefill temporaries {d / 2**20:8.1f} MiB')
    print(f'  paged forward temporaries      {p / 2**20:8.1f} MiB  ({d / p:.0f}x less)')


if __name__ == '__main__':
    main()
