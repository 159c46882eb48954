"""Token sampling, the one implementation: `generate` and the serving engine both use it, so
a seed means the same in both.

Every setting is an array over the rows (the serving engine's decode slots), so a request
with new settings joins the running batch without a recompile. For each row, in order:
penalties (repetition on prompt and output tokens, presence and frequency on output
tokens), logit_bias, then greedy (temperature 0) or temperature, top_k, top_p and min_p and
a draw from the row's own key.
The key depends only on the request's seed and the index of the token in its output, so the
same seed gives the same tokens whatever else shares the batch.
Logprobs are the log-softmax of the model's own logits, before any of the above.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from glmjax.token_mask import apply_token_bitmask

MAX_LOGIT_BIAS = 64  # logit_bias entries per request
TOP_LOGPROBS = 20  # alternatives computed per token (OpenAI's limit); 0..TOP_LOGPROBS


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [B] f32; 0 is greedy
    top_k: jax.Array  # [B] i32; 0 is no cut
    top_p: jax.Array  # [B] f32; 1 is no cut
    min_p: jax.Array  # [B] f32; 0 is no cut
    repetition_penalty: jax.Array  # [B] f32; 1 is none
    presence_penalty: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    seed: jax.Array  # [B] u32
    bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS] i32; unused entries are id 0 with bias 0
    bias_values: jax.Array  # [B, MAX_LOGIT_BIAS] f32

    @classmethod
    def make(cls, batch: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, seed: int = 0,
             logit_bias: dict[int, float] | None = None) -> 'SamplingParams':
        """The same settings on every row (numpy arrays: cheap to build on the host)."""
        ids = np.zeros((batch, MAX_LOGIT_BIAS), np.int32)
        values = np.zeros((batch, MAX_LOGIT_BIAS), np.float32)
        for j, (token, bias) in enumerate((logit_bias or {}).items()):
            ids[:, j], values[:, j] = token, bias
        full = lambda v, dt: np.full((batch,), v, dt)  # noqa: E731
        return cls(temperature=full(temperature, np.float32), top_k=full(top_k, np.int32),
                   top_p=full(top_p, np.float32), min_p=full(min_p, np.float32),
                   repetition_penalty=full(repetition_penalty, np.float32),
                   presence_penalty=full(presence_penalty, np.float32),
                   frequency_penalty=full(frequency_penalty, np.float32),
                   seed=full(seed, np.uint32), bias_ids=ids, bias_values=values)


def apply_penalties(logits: jax.Array, s: SamplingParams, counts: jax.Array,
                    prompt_mask: jax.Array) -> jax.Array:
    """logits fp32 [B, V]; counts [B, V] i32 output tokens so far; prompt_mask [B, V] bool."""
    seen = prompt_mask | (counts > 0)
    rp = s.repetition_penalty[:, None]
    # As transformers does: shrink positive logits, push negative ones further down.
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = (logits - s.frequency_penalty[:, None] * counts
              - s.presence_penalty[:, None] * (counts > 0))
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, s.bias_ids].add(s.bias_values)


def scale(logits: jax.Array, s: SamplingParams) -> jax.Array:
    return logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]


def filter_logits(logits: jax.Array, s: SamplingParams) -> jax.Array:
    """Temperature-scaled logits [B, V] with tokens cut by top_k, top_p or min_p at -inf."""
    V = logits.shape[-1]
    scaled = scale(logits, s)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
    rank = jnp.arange(V)[None, :]
    k = jnp.where(s.top_k > 0, s.top_k, V)[:, None]
    probs = jax.nn.softmax(jnp.where(rank < k, sorted_logits, -jnp.inf), axis=-1)
    # The smallest prefix whose mass reaches top_p (the first token always stays); min_p is
    # relative to the top probability, which no cut changes.
    keep = (rank < k) & ((jnp.cumsum(probs, axis=-1) - probs) < s.top_p[:, None])
    keep &= probs >= s.min_p[:, None] * probs[:, :1]
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def row_keys(seed: jax.Array, index: jax.Array) -> jax.Array:
    """One key per row from (seed, index of the token in the request's output)."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed, index)


@jax.jit  # called outside jit too (after prefill): eagerly, each lax.cond would recompile
def sample(logits: jax.Array, s: SamplingParams, counts: jax.Array, prompt_mask: jax.Array,
           index: jax.Array, allowed: jax.Array | None = None):
    """logits fp32 [B, V] -> (tokens [B] i32, their logprobs [B], top ids [B, TOP_LOGPROBS],
    top logprobs [B, TOP_LOGPROBS]). index [B]: the output position being sampled.
    allowed: a constrained-decoding bitmask [B, ceil(V / 32)] (glmjax.token_mask); the
    tokens it disallows are never drawn, and the logprobs stay the model's own."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    logits = apply_penalties(logits, s, counts, prompt_mask)
    if allowed is not None:
        logits = apply_token_bitmask(logits, allowed)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The sort behind top_k/top_p/min_p costs O(V log V) per row: skip it when no row cuts.
    cuts = (s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0))
    filtered = jax.lax.cond(jnp.any(cuts), filter_logits, scale, logits, s)
    drawn = jax.vmap(jax.random.categorical)(row_keys(s.seed, index), filtered)
    tokens = jnp.where(s.temperature > 0, drawn.astype(jnp.int32), greedy)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_ids.astype(jnp.int32), top_logprobs
