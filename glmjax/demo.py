"""glmjax-demo: generation on the embedded default, a tiny GLM-4.6-shaped model with random
weights that it builds itself (same architecture, small sizes)."""

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from glmjax import compile_cache
from glmjax.config import GlmConfig
from glmjax.generate import generate
from glmjax.model import init_params

FLAGS = flags.DEFINE_string('prompt_ids', '151331,151333,151336,100,200,300,151337',
                            'comma-separated prompt token ids (default: a GLM chat prefix)')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'tokens to generate')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 for greedy')
_SEED = flags.DEFINE_integer('seed', 0, 'weights and sampling seed')


def tiny_glm46() -> GlmConfig:
    """GLM-4.6's architecture (qk-norm, biases, partial RoPE, GQA, 3 dense layers, grouped
    sigmoid routing with scaling 2.5, MTP) at a size that runs anywhere."""
    return dataclasses.replace(
        GlmConfig.preset('glm-4.6'), hidden_size=128, intermediate_size=256,
        num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
        first_k_dense_replace=3, max_position_embeddings=4096)


def main(argv):
    del argv
    compile_cache.enable()
    cfg = tiny_glm46()
    params = init_params(cfg, jnp.float32, seed=_SEED.value)
    prompt = [int(t) for t in FLAGS.value.split(',') if t.strip()]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f'tiny GLM-4.6-shaped model: {cfg.num_hidden_layers} layers, '
          f'{cfg.n_routed_experts} experts (top {cfg.num_experts_per_tok}), '
          f'{n_params / 1e6:.1f}M parameters, on {jax.devices()[0].platform}')
    generate(cfg, params, [prompt], _MAX_NEW.value, stop_ids=())  # compile
    start = time.perf_counter()
    out = generate(cfg, params, [prompt], _MAX_NEW.value, temperature=_TEMPERATURE.value,
                   seed=_SEED.value, stop_ids=())[0]
    elapsed = time.perf_counter() - start
    print(f'prompt ids: {prompt}')
    print(f'generated ids: {out}')
    print(f'{len(out)} tokens in {elapsed * 1000:.0f} ms ({len(out) / elapsed:.0f} tokens/s)')


def run():
    app.run(main)


if __name__ == '__main__':
    run()
