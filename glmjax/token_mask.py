"""Token bitmasks on the device: the constrained-decoding mask applied to a step's logits.

A bitmask row holds ceil(V / 32) int32 words, token t allowed when bit t % 32 of word t // 32
is set (xgrammar's and llguidance's layout; glmjax.serving.constraints fills it on the host).
A sequence without a constraint gets an all-ones row, so one jitted step serves both.
"""

import jax
import jax.numpy as jnp


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def all_allowed_bitmask(batch: int, vocab_size: int) -> jax.Array:
    """[B, W] int32 with every bit set: no token masked."""
    return jnp.full((batch, bitmask_words(vocab_size)), -1, jnp.int32)


def unpack_bitmask(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """[B, W] int32 -> [B, V] bool, True where the token is allowed."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]; >> is arithmetic: bit 31 too
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(bool)


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits [B, V] with the tokens `bitmask` [B, ceil(V / 32)] disallows at -inf."""
    B, V = logits.shape
    if bitmask.shape != (B, bitmask_words(V)):
        raise ValueError(f'bitmask {bitmask.shape} does not fit logits {logits.shape}')
    return jnp.where(unpack_bitmask(bitmask, V), logits, -jnp.inf)
