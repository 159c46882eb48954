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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax.cache import KVCache, cache_shapes, init_cache
from glmjax.config import GlmConfig
from glmjax.generate import bucket
from glmjax.inference import decode, hidden_states, prefill
from glmjax.sampling import SamplingParams, sample
from glmjax.sharding.mesh import make_mesh
from glmjax.sharding.rules import Rules, cache_shardings, get_rules

MAX_STOP_IDS = 16  # stop token ids per request, the model's eos ids included
MIN_BUCKET = 16
MIN_KV_BUCKET = 128  # decode attends over at least this many positions: fewer compiles
EMBED_ROWS = 16  # prompts per embedding call; rows and lengths are padded to powers of two


class EngineLost(Exception):
    """The engine cannot go on: a process that shares the mesh is gone. Requests in flight
    cannot finish; the server stops serving."""


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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> 'SlotSettings':
        return cls(**{**raw, 'stop_ids': tuple(raw['stop_ids']),
                      'logit_bias': tuple((int(t), float(b)) for t, b in raw['logit_bias'])})

    def sampling(self) -> SamplingParams:
        return SamplingParams.make(
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
    sampling: SamplingParams


@dataclasses.dataclass
class Prefix:
    """One prefilled request: its own cache [1, bucket] and the logits after its prompt."""
    cache: KVCache
    logits: jax.Array  # [1, V]
    tokens: jax.Array  # [1, bucket] the padded prompt
    length: int
    cached_tokens: int = 0  # prompt tokens taken from a prefix cache, not computed


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
        """Puts a prefilled request into a slot. Returns its first token, or an output with
        no valid token when the prompt is computed by the next `generate` calls (PagedEngine):
        the first token then comes with their outputs."""

    supports_constraints = False  # whether generate takes token bitmasks

    @abc.abstractmethod
    def generate(self) -> StepOutput:
        """Runs steps_per_call decode steps for every active slot. An engine that
        `supports_constraints` also takes `allowed`, [max_batch, ceil(V / 32)] int32 token
        bitmasks (glmjax.token_mask), and then runs one step under them."""

    @abc.abstractmethod
    def free(self, slot: int) -> None: ...

    @abc.abstractmethod
    def embed(self, prompts: list[list[int]]) -> np.ndarray:
        """[len(prompts), D] fp32: each prompt's final hidden states, mean-pooled and
        L2-normalised. Blocks until the device is done (a host array)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Empties every slot (after an error left the decode state unusable)."""

    @abc.abstractmethod
    def warmup(self, progress=None) -> None:
        """Compiles every shape that serving will use; `progress(done, total)` after each."""

    def lost(self) -> str | None:
        """Asked after a device call failed: why the engine can never go on (a process of
        the mesh is gone), or None when it can."""
        return None

    @property
    def capacity(self) -> int:
        """The most tokens (prompt + output) one sequence can ever hold."""
        return self.max_seq_len

    def can_admit(self, prompt: list[int], max_new: int) -> bool:
        """Whether a free slot can take this request now without running out of KV memory
        later; when not, it waits in the queue (a slot engine's memory is its slots)."""
        return True


def buckets(max_seq_len: int) -> tuple[int, ...]:
    """Prompt lengths are padded to powers of two (and max_seq_len), compiled at warm-up."""
    sizes, b = [], MIN_BUCKET
    while b < max_seq_len:
        sizes.append(b)
        b *= 2
    return (*sizes, max_seq_len)


def prompt_bucket(sizes: tuple[int, ...], n: int, max_seq_len: int) -> int:
    """The smallest of `sizes` (from `buckets`) that holds a prompt of n tokens."""
    for b in sizes:
        if n <= b:
            return b
    raise ValueError(f'a prompt of {n} tokens exceeds max_seq_len={max_seq_len}')


def choose(logits, sampling, counts, prompt_mask, generated, max_new, stop_ids, active,
           allowed=None):
    """Samples one token per row (under the bitmask `allowed`, if given) and advances the
    rows that are active."""
    tokens, logprobs, top_ids, top_lps = sample(logits, sampling, counts, prompt_mask,
                                                generated, allowed)
    rows = jnp.arange(tokens.shape[0])
    counts = counts.at[rows, tokens].add(active.astype(jnp.int32))
    generated = generated + active
    stopped = jnp.any(tokens[:, None] == stop_ids, axis=-1) | (generated >= max_new)
    out = StepOutput(tokens=tokens, valid=active, logprobs=logprobs, top_ids=top_ids,
                     top_logprobs=top_lps, done=active & stopped)
    return out, counts, generated


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the engine's arrays live: a mesh, and the rules that place the KV cache on it.
    Hashable, so the jitted functions below take it as a static argument."""
    cfg: GlmConfig
    mesh: Mesh
    rules: Rules
    dtype: jnp.dtype  # of the KV cache: the weights' dtype

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def cache(self, batch: int, length: int, split_batch: bool = True) -> KVCache:
        # A prefilled prompt is one row: it cannot split over `data`.
        rules = self.rules if split_batch else dataclasses.replace(self.rules, batch=None)
        return cache_shardings(self.cfg, self.mesh,
                               cache_shapes(self.cfg, batch, length, self.dtype), rules)

    def put(self, tree):
        """Host values onto every device of the mesh (the same values in every process)."""
        return jax.device_put(tree, jax.tree.map(lambda _: self.replicated, tree))

    def state(self, batch: int, length: int) -> DecodeState:
        rep = self.replicated
        return DecodeState(cache=self.cache(batch, length), tokens=rep, done=rep,
                           generated=rep, max_new=rep, stop_ids=rep, counts=rep,
                           prompt_mask=rep, sampling=jax.tree.map(lambda _: rep,
                                                                  SamplingParams.make(batch)))


def _replicated(layout: Layout, tree):
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: layout.replicated, tree))


def _place_state(layout: Layout, state: DecodeState) -> DecodeState:
    return jax.lax.with_sharding_constraint(
        state, layout.state(state.tokens.shape[0], state.cache.max_len))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty_state(layout: Layout, batch: int, max_len: int, vocab: int) -> DecodeState:
    B, V = batch, vocab
    sampling = jax.tree.map(jnp.asarray, SamplingParams.make(B))
    return _place_state(layout, DecodeState(
        cache=init_cache(layout.cfg, B, max_len, layout.dtype),
        tokens=jnp.zeros((B,), jnp.int32), done=jnp.ones((B,), bool),
        generated=jnp.zeros((B,), jnp.int32), max_new=jnp.zeros((B,), jnp.int32),
        stop_ids=jnp.full((B, MAX_STOP_IDS), -1, jnp.int32),
        counts=jnp.zeros((B, V), jnp.int32), prompt_mask=jnp.zeros((B, V), bool),
        sampling=sampling))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _empty_prefix(layout: Layout, length: int) -> KVCache:
    return jax.lax.with_sharding_constraint(init_cache(layout.cfg, 1, length, layout.dtype),
                                            layout.cache(1, length, split_batch=False))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames='cache')
def _prefill_chunk(cfg: GlmConfig, layout: Layout, params: dict, tokens: jax.Array,
                   length: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Appends one chunk of a prompt, tokens [1, chunk], to its own cache [1, bucket]."""
    logits, cache = prefill(cfg, params, tokens, length, cache)
    return _replicated(layout, logits), jax.lax.with_sharding_constraint(
        cache, layout.cache(1, cache.max_len, split_batch=False))


@functools.partial(jax.jit, static_argnums=0, donate_argnames='state')
def _insert(layout: Layout, state: DecodeState, prefix_cache: KVCache, logits: jax.Array,
            tokens: jax.Array, length: jax.Array, slot: jax.Array, row: SamplingParams,
            max_new: jax.Array, stop_ids: jax.Array) -> tuple[DecodeState, StepOutput]:
    V = logits.shape[-1]
    at = lambda big, small: jax.lax.dynamic_update_slice(  # noqa: E731
        big, small.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1))
    cache = KVCache(k=tuple(at(a, b) for a, b in zip(state.cache.k, prefix_cache.k)),
                    v=tuple(at(a, b) for a, b in zip(state.cache.v, prefix_cache.v)),
                    lengths=state.cache.lengths.at[slot].set(length))
    real = jnp.arange(tokens.shape[1]) < length
    mask = jnp.zeros((1, V), bool).at[0, jnp.where(real, tokens[0], V)].set(True, mode='drop')
    out, counts, generated = choose(logits, row, jnp.zeros((1, V), jnp.int32), mask,
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
    out = jax.tree.map(lambda x: x[:, None] if x.ndim == 1 else x[:, None, :], out)
    return _place_state(layout, state), _replicated(layout, out)


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5), donate_argnames='state')
def _generate(cfg: GlmConfig, layout: Layout, params: dict, state: DecodeState, steps: int,
              kv_len: int) -> tuple[DecodeState, StepOutput]:
    def step(state: DecodeState, _):
        active = ~state.done
        logits, cache = decode(cfg, params, state.tokens, state.cache, kv_len=kv_len)
        # Done and free slots keep their length: nothing they compute is ever read.
        cache = cache.replace(lengths=jnp.where(active, cache.lengths, state.cache.lengths))
        out, counts, generated = choose(logits, state.sampling, state.counts,
                                         state.prompt_mask, state.generated, state.max_new,
                                         state.stop_ids, active)
        state = state.replace(cache=cache, tokens=jnp.where(active, out.tokens, state.tokens),
                              done=state.done | out.done, counts=counts, generated=generated)
        return state, out

    state, outs = jax.lax.scan(step, state, None, length=steps)  # each [steps, B, ...]
    outs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)
    return _place_state(layout, state), _replicated(layout, outs.replace(done=state.done))


@functools.partial(jax.jit, static_argnums=(0, 1))
def pooled(cfg: GlmConfig, layout: Layout, params: dict, tokens: jax.Array,
            mask: jax.Array) -> jax.Array:
    # Causal attention: right padding never changes the real tokens' states.
    h = hidden_states(cfg, params, tokens).astype(jnp.float32)
    pooled = (h * mask).sum(1) / mask.sum(1)
    pooled = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return jax.lax.with_sharding_constraint(pooled, layout.replicated)


@functools.partial(jax.jit, static_argnums=0, donate_argnames='state')
def _free(layout: Layout, state: DecodeState, slot: jax.Array) -> DecodeState:
    # A free slot still runs through the batch: from length 0 it stays inside any kv_len.
    cache = state.cache.replace(lengths=state.cache.lengths.at[slot].set(0))
    return _place_state(layout, state.replace(cache=cache, done=state.done.at[slot].set(True)))


def local(out: StepOutput) -> StepOutput:
    """Replicated outputs: this process's first copy can be fetched even when the mesh
    spans other processes. Still asynchronous."""
    return jax.tree.map(lambda x: x.addressable_data(0), out)


def embed_prompts(cfg: GlmConfig, layout: Layout, params: dict, prompts: list[list[int]],
                  length_bucket, put) -> np.ndarray:
    """Engine.embed over the model's contiguous forward (no cache is needed): rows in calls
    of at most EMBED_ROWS, rows and lengths padded to powers of two, so a few programs serve
    every call. `put` places host arrays for the mesh."""
    out = []
    for start in range(0, len(prompts), EMBED_ROWS):
        part = prompts[start:start + EMBED_ROWS]
        B, T = bucket(len(part), 1), length_bucket(max(len(p) for p in part))
        tokens = np.zeros((B, T), np.int32)
        mask = np.zeros((B, T, 1), np.float32)
        mask[len(part):, 0] = 1.0  # padding rows: one position, no division by zero
        for i, p in enumerate(part):
            tokens[i, :len(p)], mask[i, :len(p)] = p, 1.0
        with jax.set_mesh(layout.mesh):
            vectors = pooled(cfg, layout, params, *put((tokens, mask)))
        out.append(np.asarray(vectors.addressable_data(0))[:len(part)])
    return np.concatenate(out)


class GlmEngine(Engine):
    """The engine over glmjax's jitted prefill and decode, on a device mesh (default: the
    first device). On a mesh that spans several processes every process must make the same
    calls with the same arguments in the same order (serving/lockstep.py sees to that).

    Prompts are prefilled `prefill_chunk` tokens per call, into a cache as long as their
    bucket. Decode reads only the filled part of the cache: the host keeps an upper bound of
    each slot's length (without asking the device) and picks the smallest of `kv_buckets`
    that covers every slot for the whole call.
    """

    def __init__(self, cfg: GlmConfig, params: dict, max_batch: int, max_seq_len: int,
                 steps_per_call: int = 4, mesh: Mesh | None = None,
                 rules: Rules | str | None = None, prefill_chunk: int = 512):
        if not 0 < max_seq_len <= cfg.max_position_embeddings:
            raise ValueError(f'max_seq_len must be between 1 and the model context of '
                             f'{cfg.max_position_embeddings}, got {max_seq_len}')
        for name, value in (('max_batch', max_batch), ('steps_per_call', steps_per_call),
                            ('prefill_chunk', prefill_chunk)):
            if value < 1:
                raise ValueError(f'{name} must be >= 1, got {value}')
        self.cfg, self.params = cfg, params
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_size, self.steps_per_call = cfg.vocab_size, steps_per_call
        self.prefill_chunk = prefill_chunk
        mesh = make_mesh({}, jax.devices()[:1]) if mesh is None else mesh
        self.layout = Layout(cfg, mesh, get_rules(rules),
                             jnp.dtype(params['model']['embed'].dtype))
        self.layout.state(max_batch, max_seq_len)  # a RulesError now, not at the first call
        self.buckets = buckets(max_seq_len)
        self.kv_buckets = tuple(b for b in self.buckets if b >= MIN_KV_BUCKET) or (max_seq_len,)
        self._bound = np.zeros(max_batch, np.int64)  # per slot; 0 when free
        self.state = self._new_state()

    def _new_state(self) -> DecodeState:
        with jax.set_mesh(self.layout.mesh):
            return _empty_state(self.layout, self.max_batch, self.max_seq_len, self.vocab_size)

    def bucket(self, n: int) -> int:
        return prompt_bucket(self.buckets, n, self.max_seq_len)

    def kv_bucket(self, n: int) -> int:
        return next((b for b in self.kv_buckets if n <= b), self.kv_buckets[-1])

    def prefill(self, tokens: list[int]) -> Prefix:
        put = self.layout.put
        n, b = len(tokens), self.bucket(len(tokens))
        width = min(b, self.prefill_chunk)
        padded = np.zeros((1, -(-b // width) * width), np.int32)
        padded[0, :n] = tokens
        with jax.set_mesh(self.layout.mesh):
            cache = _empty_prefix(self.layout, b)
            for start in range(0, n, width):
                length = np.array([min(width, n - start)], np.int32)
                logits, cache = _prefill_chunk(
                    self.cfg, self.layout, self.params,
                    put(padded[:, start:start + width]), put(length), cache)
        return Prefix(cache=cache, logits=logits, tokens=put(padded[:, :b]), length=n)

    def insert(self, prefix: Prefix, slot: int, settings: SlotSettings) -> StepOutput:
        if len(settings.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f'at most {MAX_STOP_IDS} stop ids, got {len(settings.stop_ids)}')
        stop = np.full((MAX_STOP_IDS,), -1, np.int32)
        stop[:len(settings.stop_ids)] = settings.stop_ids
        host = (np.int32(prefix.length), np.int32(slot), settings.sampling(),
                np.int32(settings.max_new), stop)
        with jax.set_mesh(self.layout.mesh):
            self.state, out = _insert(self.layout, self.state, prefix.cache, prefix.logits,
                                      prefix.tokens, *self.layout.put(host))
        self._bound[slot] = prefix.length
        return local(out)

    def generate(self) -> StepOutput:
        return self._decode(self.kv_bucket(int(self._bound.max()) + self.steps_per_call))

    def _decode(self, kv_len: int) -> StepOutput:
        with jax.set_mesh(self.layout.mesh):
            self.state, out = _generate(self.cfg, self.layout, self.params, self.state,
                                        self.steps_per_call, kv_len)
        self._bound[self._bound > 0] += self.steps_per_call
        return local(out)

    def free(self, slot: int) -> None:
        with jax.set_mesh(self.layout.mesh):
            self.state = _free(self.layout, self.state, self.layout.put(np.int32(slot)))
        self._bound[slot] = 0

    def reset(self) -> None:
        self.state = self._new_state()
        self._bound[:] = 0

    def embed(self, prompts: list[list[int]]) -> np.ndarray:
        return embed_prompts(self.cfg, self.layout, self.params, prompts, self.bucket,
                             self.layout.put)

    def warmup(self, progress=None) -> None:
        total = len(self.buckets) + len(self.kv_buckets)
        for i, b in enumerate(self.buckets):
            self.insert(self.prefill([0] * b), 0, SlotSettings(max_new=1))
            jax.block_until_ready(self.state)
            if progress is not None:
                progress(i + 1, total)
        for i, kv_len in enumerate(self.kv_buckets):
            self._decode(kv_len)
            jax.block_until_ready(self.state)
            if progress is not None:
                progress(len(self.buckets) + i + 1, total)
        self.reset()
