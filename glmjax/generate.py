"""`generate`: prefill a batch of prompts, then decode on the device for many steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.cache import KVCache, init_cache
from glmjax.config import GlmConfig
from glmjax.inference import decode, prefill
from glmjax.sampling import SamplingParams, sample


def bucket(n: int, minimum: int = 16) -> int:
    """Pads lengths to powers of two so that few shapes are ever compiled."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _sample(logits: jax.Array, sampling: SamplingParams, index) -> jax.Array:
    """The serving sampler with no penalties: output token `index` of every row."""
    B, V = logits.shape
    no_counts, no_prompt = jnp.zeros((B, V), jnp.int32), jnp.zeros((B, V), bool)
    return sample(logits, sampling, no_counts, no_prompt, jnp.full((B,), index, jnp.int32))[0]


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnames='cache')
def _decode_loop(cfg: GlmConfig, params: dict, tokens: jax.Array, cache: KVCache,
                 steps: int, sampling: SamplingParams):
    """`steps` decode steps in one call (output tokens 1 to steps); returns the [B, steps]
    sampled tokens."""
    def step(carry, index):
        tokens, cache = carry
        logits, cache = decode(cfg, params, tokens, cache)
        tokens = _sample(logits, sampling, index)
        return (tokens, cache), tokens

    (_, cache), out = jax.lax.scan(step, (tokens, cache), jnp.arange(1, steps + 1))
    return out.T, cache


def generate(cfg: GlmConfig, params: dict, prompts: list[list[int]], max_new_tokens: int,
             *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, seed: int = 0,
             stop_ids: tuple[int, ...] | None = None) -> list[list[int]]:
    """Continues each prompt (token ids) by up to max_new_tokens tokens, stopping after a
    stop id (the config's eos ids by default). Greedy when temperature is 0. Row i samples
    with seed + i, as the server does for a request with that seed (and for the i-th of n
    choices over HTTP)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError('generate needs at least one prompt, and no empty prompt')
    if max_new_tokens < 1:
        raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f'token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})')
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f'prompt of {longest} tokens + {max_new_tokens} new tokens exceeds '
                         f'the context of {cfg.max_position_embeddings}')
    B, T = len(prompts), bucket(longest)
    tokens = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)
    dtype = params['model']['embed'].dtype
    cache = init_cache(cfg, B, T + bucket(max_new_tokens), dtype)
    sampling = SamplingParams.make(B, temperature, top_k, top_p, min_p).replace(
        seed=(seed + np.arange(B)).astype(np.uint32))
    logits, cache = prefill(cfg, params, jnp.asarray(tokens), lengths, cache)
    first = jax.jit(_sample)(logits, sampling, 0)
    out = [first[:, None]]
    if max_new_tokens > 1:
        rest, _ = _decode_loop(cfg, params, first, cache, max_new_tokens - 1, sampling)
        out.append(rest)
    generated = np.asarray(jnp.concatenate(out, axis=1))
    stops = set(cfg.eos_token_ids if stop_ids is None else stop_ids)
    result = []
    for row in generated.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result
