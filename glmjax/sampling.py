"""Token sampling with per-row settings as arrays, so new settings never recompile."""

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingParams:
    """Per row: temperature 0 means greedy; top_k 0 and top_p 1 mean no cut."""
    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] i32
    top_p: jax.Array  # [B] f32

    @classmethod
    def make(cls, batch: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0) -> 'SamplingParams':
        return cls(temperature=jnp.full((batch,), temperature, jnp.float32),
                   top_k=jnp.full((batch,), top_k, jnp.int32),
                   top_p=jnp.full((batch,), top_p, jnp.float32))


@jax.jit  # called outside jit too (after prefill): eagerly, each lax.cond would recompile
def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """logits: fp32 [B, V] -> token ids [B] int32.

    Over GLM's 151k-token vocabulary the random draw and the sort cost more than the model's
    last layers, so each runs only when some row needs it: greedy rows need only the argmax.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = params.temperature > 0

    def draw(logits):
        t = jnp.where(hot, params.temperature, 1.0)[:, None]
        scaled = logits / t
        cut = (params.top_k > 0) | (params.top_p < 1)
        scaled = jax.lax.cond(jnp.any(cut & hot), lambda s: _cut(s, params), lambda s: s,
                              scaled)
        return jax.random.categorical(key, scaled).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(hot), draw, lambda _: greedy, logits)
    return jnp.where(hot, sampled, greedy)


def _cut(scaled: jax.Array, params: SamplingParams) -> jax.Array:
    """Masks, per row, the tokens outside its top-k and top-p sets."""
    V = scaled.shape[-1]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
    rank = jnp.arange(V)[None, :]
    k = jnp.where(params.top_k > 0, params.top_k, V)[:, None]
    probs = jax.nn.softmax(jnp.where(rank < k, sorted_logits, -jnp.inf), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (rank < k) & ((jnp.cumsum(probs, axis=-1) - probs) < params.top_p[:, None])
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)
