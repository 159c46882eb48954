"""The engine interface the orchestrator drives, and its implementation over glmjax.

As in JetStream: `prefill` one request into a small cache of its own (its length bucketed,
so every shape is compiled at warm-up), `insert` that cache into a decode slot (which also
samples the first token), `generate` a few tokens for every slot in one jitted call (a
lax.scan of decode steps) and `free` a slot. The decode state lives on the device; every
call returns at once (JAX dispatches asynchronously) and outputs stay device arrays until
the orchestrator fetches them.

A slot is done (device side) once it samples one of its stop ids or reaches its token
budget; done and free slots still run through the batch but neither advance nor emit.
"""

import abc
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from glmjax.cache import KVCache, init_cache
from glmjax.config import GlmConfig
from glmjax.inference import decode, prefill
from serving.sampling import SlotSampling, sample

MAX_STOP_IDS = 16  # stop token ids per request, the model's eos ids included
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SlotSettings:
    """What a request sets for its slot (host values)."""
    max_new: int  # tokens to generate at most (max_tokens, or what the context leaves)
    stop_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def sampling(self) -> SlotSampling:
        return SlotSampling.make(
            1, self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
            self.presence_penalty, self.frequency_penalty, self.seed, dict(self.logit_bias))


@struct.dataclass
class StepOutput:
    """Tokens sampled by one call: [B, steps] (insert: [1, 1]); valid marks real tokens."""
    tokens: jax.Array  # i32
    valid: jax.Array  # bool
    logprobs: jax.Array  # f32
    top_ids: jax.Array  # [..., TOP_LOGPROBS] i32
    top_logprobs: jax.Array  # [..., TOP_LOGPROBS] f32
    done: jax.Array  # [B] (insert: [1]) bool: the slot is done after this call


@struct.dataclass
class DecodeState:
    cache: KVCache  # [B, S]
    tokens: jax.Array  # [B] i32: each slot's last token, the next decode input
    done: jax.Array  # [B] bool: free or finished
    generated: jax.Array  # [B] i32: tokens generated so far
    max_new: jax.Array  # [B] i32
    stop_ids: jax.Array  # [B, MAX_STOP_IDS] i32, -1 unused
    counts: jax.Array  # [B, V] i32: how often each token was generated (penalties)
    prompt_mask: jax.Array  # [B, V] bool: tokens of the prompt (repetition penalty)
    sampling: SlotSampling


@dataclasses.dataclass
class Prefix:
    """One prefilled request: its own cache [1, bucket] and the logits after its prompt."""
    cache: KVCache
    logits: jax.Array  # [1, V]
    tokens: jax.Array  # [1, bucket] the padded prompt
    length: int


class Engine(abc.ABC):
    """What the orchestrator needs from a model. Only one thread calls these."""
    max_batch: int
    max_seq_len: int
    vocab_size: int
    steps_per_call: int

    @abc.abstractmethod
    def prefill(self, tokens: list[int]) -> Prefix: ...

    @abc.abstractmethod
    def insert(self, prefix: Prefix, slot: int, settings: SlotSettings) -> StepOutput:
        """Puts a prefilled request into a slot and samples its first token."""

    @abc.abstractmethod
    def generate(self) -> StepOutput:
        """Runs steps_per_call decode steps for every active slot."""

    @abc.abstractmethod
    def free(self, slot: int) -> None: ...

    @abc.abstractmethod
    def reset(self) -> None:
        """Empties every slot (after an error left the decode state unusable)."""

    @abc.abstractmethod
    def warmup(self) -> None:
        """Compiles every shape that serving will use."""


def buckets(max_seq_len: int) -> tuple[int, ...]:
    """Prompt lengths are padded to powers of two (and max_seq_len), compiled at warm-up."""
    sizes, b = [], MIN_BUCKET
    while b < max_seq_len:
        sizes.append(b)
        b *= 2
    return (*sizes, max_seq_len)


def _choose(logits, sampling, counts, prompt_mask, generated, max_new, stop_ids, active):
    """Samples one token per row and advances the rows that are active."""
    tokens, logprobs, top_ids, top_lps = sample(logits, sampling, counts, prompt_mask,
                                                generated)
    rows = jnp.arange(tokens.shape[0])
    counts = counts.at[rows, tokens].add(active.astype(jnp.int32))
    generated = generated + active
    stopped = jnp.any(tokens[:, None] == stop_ids, axis=-1) | (generated >= max_new)
    out = StepOutput(tokens=tokens, valid=active, logprobs=logprobs, top_ids=top_ids,
                     top_logprobs=top_lps, done=active & stopped)
    return out, counts, generated


@functools.partial(jax.jit, static_argnums=0)
def _prefill_one(cfg: GlmConfig, params: dict, tokens: jax.Array, length: jax.Array):
    """tokens [1, bucket] -> (logits [1, V], a fresh cache [1, bucket] holding the prompt)."""
    cache = init_cache(cfg, 1, tokens.shape[1], params['model']['embed'].dtype)
    return prefill(cfg, params, tokens, length, cache)


@functools.partial(jax.jit, donate_argnames='state')
def _insert(state: DecodeState, prefix_cache: KVCache, logits: jax.Array, tokens: jax.Array,
            length: jax.Array, slot: jax.Array, row: SlotSampling, max_new: jax.Array,
            stop_ids: jax.Array) -> tuple[DecodeState, StepOutput]:
    V = logits.shape[-1]
    at = lambda big, small: jax.lax.dynamic_update_slice(  # noqa: E731
        big, small.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1))
    cache = KVCache(k=tuple(at(a, b) for a, b in zip(state.cache.k, prefix_cache.k)),
                    v=tuple(at(a, b) for a, b in zip(state.cache.v, prefix_cache.v)),
                    lengths=state.cache.lengths.at[slot].set(length))
    real = jnp.arange(tokens.shape[1]) < length
    mask = jnp.zeros((1, V), bool).at[0, jnp.where(real, tokens[0], V)].set(True, mode='drop')
    out, counts, generated = _choose(logits, row, jnp.zeros((1, V), jnp.int32), mask,
                                     jnp.zeros((1,), jnp.int32), max_new[None], stop_ids[None],
                                     jnp.ones((1,), bool))
    sampling = jax.tree.map(lambda a, r: a.at[slot].set(r[0]), state.sampling, row)
    state = DecodeState(
        cache=cache, tokens=state.tokens.at[slot].set(out.tokens[0]),
        done=state.done.at[slot].set(out.done[0]),
        generated=state.generated.at[slot].set(generated[0]),
        max_new=state.max_new.at[slot].set(max_new), stop_ids=state.stop_ids.at[slot].set(stop_ids),
        counts=state.counts.at[slot].set(counts[0]),
        prompt_mask=state.prompt_mask.at[slot].set(mask[0]), sampling=sampling)
    return state, jax.tree.map(lambda x: x[:, None] if x.ndim == 1 else x[:, None, :], out)


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnames='state')
def _generate(cfg: GlmConfig, params: dict, state: DecodeState,
              steps: int) -> tuple[DecodeState, StepOutput]:
    def step(state: DecodeState, _):
        active = ~state.done
        logits, cache = decode(cfg, params, state.tokens, state.cache)
        # Done and free slots keep their length: nothing they compute is ever read.
        cache = cache.replace(lengths=jnp.where(active, cache.lengths, state.cache.lengths))
        out, counts, generated = _choose(logits, state.sampling, state.counts,
                                         state.prompt_mask, state.generated, state.max_new,
                                         state.stop_ids, active)
        state = state.replace(cache=cache, tokens=jnp.where(active, out.tokens, state.tokens),
                              done=state.done | out.done, counts=counts, generated=generated)
        return state, out

    state, outs = jax.lax.scan(step, state, None, length=steps)  # each [steps, B, ...]
    outs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)
    return state, outs.replace(done=state.done)


@functools.partial(jax.jit, donate_argnames='state')
def _free(state: DecodeState, slot: jax.Array) -> DecodeState:
    return state.replace(done=state.done.at[slot].set(True))


class GlmEngine(Engine):
    """The engine over glmjax's jitted prefill and decode, on the default device."""

    def __init__(self, cfg: GlmConfig, params: dict, max_batch: int, max_seq_len: int,
                 steps_per_call: int = 4):
        if not 0 < max_seq_len <= cfg.max_position_embeddings:
            raise ValueError(f'max_seq_len must be between 1 and the model context of '
                             f'{cfg.max_position_embeddings}, got {max_seq_len}')
        self.cfg, self.params = cfg, params
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_size, self.steps_per_call = cfg.vocab_size, steps_per_call
        self.buckets = buckets(max_seq_len)
        self.state = self._empty_state()

    def _empty_state(self) -> DecodeState:
        B, V = self.max_batch, self.vocab_size
        dtype = self.params['model']['embed'].dtype
        return DecodeState(
            cache=init_cache(self.cfg, B, self.max_seq_len, dtype),
            tokens=jnp.zeros((B,), jnp.int32), done=jnp.ones((B,), bool),
            generated=jnp.zeros((B,), jnp.int32), max_new=jnp.zeros((B,), jnp.int32),
            stop_ids=jnp.full((B, MAX_STOP_IDS), -1, jnp.int32),
            counts=jnp.zeros((B, V), jnp.int32), prompt_mask=jnp.zeros((B, V), bool),
            sampling=jax.tree.map(jnp.asarray, SlotSampling.make(B)))

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f'a prompt of {n} tokens exceeds max_seq_len={self.max_seq_len}')

    def prefill(self, tokens: list[int]) -> Prefix:
        padded = np.zeros((1, self.bucket(len(tokens))), np.int32)
        padded[0, :len(tokens)] = tokens
        padded = jnp.asarray(padded)
        logits, cache = _prefill_one(self.cfg, self.params, padded,
                                     jnp.array([len(tokens)], jnp.int32))
        return Prefix(cache=cache, logits=logits, tokens=padded, length=len(tokens))

    def insert(self, prefix: Prefix, slot: int, settings: SlotSettings) -> StepOutput:
        if len(settings.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f'at most {MAX_STOP_IDS} stop ids, got {len(settings.stop_ids)}')
        stop = np.full((MAX_STOP_IDS,), -1, np.int32)
        stop[:len(settings.stop_ids)] = settings.stop_ids
        self.state, out = _insert(self.state, prefix.cache, prefix.logits, prefix.tokens,
                                  jnp.int32(prefix.length), jnp.int32(slot),
                                  settings.sampling(), jnp.int32(settings.max_new), stop)
        return out

    def generate(self) -> StepOutput:
        self.state, out = _generate(self.cfg, self.params, self.state, self.steps_per_call)
        return out

    def free(self, slot: int) -> None:
        self.state = _free(self.state, jnp.int32(slot))

    def reset(self) -> None:
        self.state = self._empty_state()

    def warmup(self) -> None:
        for b in self.buckets:
            self.insert(self.prefill([0] * b), 0, SlotSettings(max_new=1))
        self.generate()
        jax.block_until_ready(self.state)
        self.reset()
