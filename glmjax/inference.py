"""Pure, jitted entry points: `forward` (no cache), `prefill` and `decode` (cache donated).

Rows of a batch may hold sequences of different lengths: prompts are right-padded and each
row's `lengths` says how many of its tokens are real. A row's cache holds garbage past its
length (padding is written too) but a query only sees keys at positions <= its own, and the
next real token overwrites the first garbage slot before anyone can see it.
"""

import functools

import jax
import jax.numpy as jnp

from glmjax.cache import KVCache
from glmjax.config import GlmConfig
from glmjax.model import merge


@functools.partial(jax.jit, static_argnums=0)
def hidden_states(cfg: GlmConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int32 -> final hidden states [B, T, D] (after the final norm)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h, _ = merge(cfg, params)(tokens, positions)
    return h


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: GlmConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """Full causal forward without a cache: tokens [B, T] int32 -> fp32 logits [B, T, V]."""
    return merge(cfg, params).logits(hidden_states(cfg, params, tokens))


@functools.partial(jax.jit, static_argnums=0, static_argnames='kv_len',
                   donate_argnames='cache')
def prefill(cfg: GlmConfig, params: dict, tokens: jax.Array, lengths: jax.Array,
            cache: KVCache, kv_len: int | None = None) -> tuple[jax.Array, KVCache]:
    """Appends a right-padded chunk to each row of the cache.

    tokens: [B, T] int32; lengths: [B] real tokens per row (0 leaves a row untouched).
    Returns the logits after each row's last real token, fp32 [B, V], and the cache.
    Calling it again continues the same rows (chunked prefill). `kv_len`, if given, must
    bound cache.lengths + T for every row: attention then reads only that much of the cache.
    """
    model = merge(cfg, params)
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1])[None, :]
    h, kv = model(tokens, positions, cache.layers(), kv_len)
    last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache.replace_layers(kv, cache.lengths + lengths)


@functools.partial(jax.jit, static_argnums=0, static_argnames='kv_len',
                   donate_argnames='cache')
def decode(cfg: GlmConfig, params: dict, tokens: jax.Array, cache: KVCache,
           kv_len: int | None = None) -> tuple[jax.Array, KVCache]:
    """One step for every row: tokens [B] int32 -> fp32 logits [B, V] and the cache.
    `kv_len`, if given, must bound cache.lengths + 1: attention reads only that much."""
    model = merge(cfg, params)
    h, kv = model(tokens[:, None], cache.lengths[:, None], cache.layers(), kv_len)
    return model.logits(h[:, 0]), cache.replace_layers(kv, cache.lengths + 1)


@functools.partial(jax.jit, static_argnums=0)
def mtp_forward(cfg: GlmConfig, params: dict, hidden: jax.Array,
                next_tokens: jax.Array) -> jax.Array:
    """The MTP head over a whole sequence, no cache.

    hidden: [B, T, D] from `hidden_states`; next_tokens: [B, T], the token at t+1 for each t.
    Returns fp32 [B, T, V]: logits for the token at t+2.
    """
    positions = jnp.broadcast_to(jnp.arange(hidden.shape[1]), next_tokens.shape)
    logits, _ = merge(cfg, params, 'mtp')(merge(cfg, params), hidden, next_tokens, positions)
    return logits
