"""`PagedEngine`: the Engine interface over a paged KV cache, so that a step costs what its
active sequences cost, and repeated prompt prefixes are not recomputed.

What lives where:
- the device holds one page pool per layer (`KVPages`, [K, P, L, H] each) shared by every
  sequence, and per slot the decode state that GlmEngine keeps (last token, length, done,
  sampling rows, penalty counts, prompt mask, stop ids, max_new);
- the host holds the bookkeeping (`PageManager`: page tables, reference counts, the prefix
  cache) and decides every page table, so the device never allocates.

The calls, as the orchestrator makes them:
- `prefill(tokens)` begins a sequence: its longest cached prefix is taken by reference and
  only the rest is computed, `prefill_chunk` tokens per call (one row of a ragged batch, the
  chunk padded to a power of two), straight into its own pages. The prompt's full pages are
  then registered in the prefix cache. `Prefix.cached_tokens` says how many were reused.
- `insert(prefix, slot, settings)` binds the sequence to a slot and samples its first token.
- `generate()` packs the slots in use (inserted, not yet freed) into a ragged batch of
  decode rows padded to the smallest of `row_buckets` (powers of two up to max_batch), and
  runs steps_per_call steps of it: one sequence alone costs a 1-row step. Before the call
  the host reserves the pages every row may write in it. Outputs are scattered back to
  [max_batch, steps] so that the orchestrator sees GlmEngine's shapes.
- `free(slot)` finishes the sequence: its pages are released; the cached ones stay in the
  prefix cache until evicted.

As in GlmEngine, a row that is done on the device (a stop id, its budget) runs on until the
host frees it, neither advancing nor emitting: it rewrites the K/V at its current length, a
position in a page it owns alone, never a shared one (shared pages are full prompt pages).

Not yet (issue 15): preemption (a pool that cannot give a step its pages raises
`OutOfPages` with the numbers), prefill chunks interleaved with decode steps in one batch,
caching the pages of generated tokens (the host does not see them), meshes (one device).
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from glmjax.cache import kv_bytes_per_token
from glmjax.config import GlmConfig
from glmjax.paged_inference import KVPages, init_pages, paged_forward
from glmjax.sampling import TOP_LOGPROBS, SamplingParams
from glmjax.serving.engine import (
    MAX_STOP_IDS,
    Engine,
    Layout,
    Prefix,
    SlotSettings,
    StepOutput,
    buckets,
    choose,
    embed_prompts,
    local,
)
from glmjax.serving.kv_pages import OutOfPages, PageManager, pages_for
from glmjax.sharding.mesh import make_mesh
from glmjax.sharding.rules import Rules, get_rules, pages_shardings

MIN_CHUNK_BUCKET = 16  # prefill chunks are padded to powers of two from here to prefill_chunk


@struct.dataclass
class SlotState:
    """Per-slot decode state, [B] = [max_batch] rows, as GlmEngine's DecodeState without the
    cache."""
    tokens: jax.Array  # [B] i32: each slot's last token, the next decode input
    lengths: jax.Array  # [B] i32: positions whose K/V is in the pages; the next goes there
    done: jax.Array  # [B] bool: free or finished
    generated: jax.Array  # [B] i32
    max_new: jax.Array  # [B] i32
    stop_ids: jax.Array  # [B, MAX_STOP_IDS] i32, -1 unused
    counts: jax.Array  # [B, V] i32
    prompt_mask: jax.Array  # [B, V] bool
    sampling: SamplingParams


@dataclasses.dataclass
class PagedPrefix(Prefix):
    """A prefilled sequence: its K/V is already in the pool, under `seq_id` (no `cache`);
    `tokens` [1, max_seq_len] is the padded prompt, for insert's prompt mask."""
    seq_id: int = -1


@functools.partial(jax.jit, static_argnums=(0, 1))
def _empty_state(batch: int, vocab: int) -> SlotState:
    B, V = batch, vocab
    return SlotState(
        tokens=jnp.zeros((B,), jnp.int32), lengths=jnp.zeros((B,), jnp.int32),
        done=jnp.ones((B,), bool), generated=jnp.zeros((B,), jnp.int32),
        max_new=jnp.zeros((B,), jnp.int32), stop_ids=jnp.full((B, MAX_STOP_IDS), -1, jnp.int32),
        counts=jnp.zeros((B, V), jnp.int32), prompt_mask=jnp.zeros((B, V), bool),
        sampling=jax.tree.map(jnp.asarray, SamplingParams.make(B)))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames='pages')
def _prefill_chunk(cfg: GlmConfig, attn_impl: str | None, params: dict, pages: KVPages,
                   tokens: jax.Array, start: jax.Array, length: jax.Array,
                   page_indices: jax.Array) -> tuple[jax.Array, KVPages]:
    """Positions start..start+length-1 of one sequence: tokens [T] (padded past length),
    page_indices [1, M]. Returns the logits after its last token [1, V] and the pages."""
    positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
    kv_lens = (start + length)[None]
    cu_q_lens = jnp.stack([jnp.zeros((), jnp.int32), length])
    return paged_forward(cfg, params, tokens, positions, pages, kv_lens, page_indices,
                         cu_q_lens, jnp.ones((1,), jnp.int32), attn_impl=attn_impl)


@functools.partial(jax.jit, donate_argnames='state')
def _insert(state: SlotState, logits: jax.Array, tokens: jax.Array, length: jax.Array,
            slot: jax.Array, row: SamplingParams, max_new: jax.Array,
            stop_ids: jax.Array) -> tuple[SlotState, StepOutput]:
    """GlmEngine's insert without the cache copy: the K/V is in the pages already."""
    V = logits.shape[-1]
    real = jnp.arange(tokens.shape[1]) < length
    mask = jnp.zeros((1, V), bool).at[0, jnp.where(real, tokens[0], V)].set(True, mode='drop')
    out, counts, generated = choose(logits, row, jnp.zeros((1, V), jnp.int32), mask,
                                     jnp.zeros((1,), jnp.int32), max_new[None], stop_ids[None],
                                     jnp.ones((1,), bool))
    state = state.replace(
        tokens=state.tokens.at[slot].set(out.tokens[0]), lengths=state.lengths.at[slot].set(length),
        done=state.done.at[slot].set(out.done[0]),
        generated=state.generated.at[slot].set(generated[0]),
        max_new=state.max_new.at[slot].set(max_new), stop_ids=state.stop_ids.at[slot].set(stop_ids),
        counts=state.counts.at[slot].set(counts[0]),
        prompt_mask=state.prompt_mask.at[slot].set(mask[0]),
        sampling=jax.tree.map(lambda a, r: a.at[slot].set(r[0]), state.sampling, row))
    return state, jax.tree.map(lambda x: x[:, None] if x.ndim == 1 else x[:, None, :], out)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnames=('pages', 'state'))
def _generate(cfg: GlmConfig, attn_impl: str | None, steps: int, params: dict, pages: KVPages,
              state: SlotState, slots: jax.Array, num_seqs: jax.Array,
              page_indices: jax.Array) -> tuple[KVPages, SlotState, StepOutput]:
    """`steps` decode steps of the R packed rows: slots [R] i32 (padding rows: max_batch),
    num_seqs [1] live rows, page_indices [R, M]. Returns outputs [max_batch, steps]."""
    B, R = state.tokens.shape[0], slots.shape[0]
    live = jnp.arange(R) < num_seqs[0]
    rows = jax.tree.map(lambda x: jnp.take(x, slots, axis=0, mode='clip'), state)  # [R, ...]
    cu_q_lens = jnp.arange(R + 1, dtype=jnp.int32)  # one token per row

    def step(carry, _):
        pages, rows = carry
        active = live & ~rows.done
        # Each row writes its last token at its length, then attends over length + 1.
        logits, pages = paged_forward(cfg, params, rows.tokens, rows.lengths, pages,
                                      rows.lengths + 1, page_indices, cu_q_lens, num_seqs,
                                      attn_impl=attn_impl)
        out, counts, generated = choose(logits, rows.sampling, rows.counts, rows.prompt_mask,
                                         rows.generated, rows.max_new, rows.stop_ids, active)
        rows = rows.replace(tokens=jnp.where(active, out.tokens, rows.tokens),
                            lengths=rows.lengths + active, done=rows.done | out.done,
                            counts=counts, generated=generated)
        return (pages, rows), out

    (pages, rows), outs = jax.lax.scan(step, (pages, rows), None, length=steps)
    # Back to the slots: padding rows (slot B) are dropped.
    state = jax.tree.map(lambda big, r: big.at[slots].set(r, mode='drop'), state, rows)
    outs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)  # [R, steps, ...]
    full = jax.tree.map(lambda x: jnp.zeros((B,) + x.shape[1:], x.dtype)
                        .at[slots].set(x, mode='drop'), outs)
    return pages, state, full.replace(done=state.done)


@functools.partial(jax.jit, donate_argnames='state')
def _mark_done(state: SlotState, slot: jax.Array) -> SlotState:
    return state.replace(done=state.done.at[slot].set(True))


def row_buckets(max_batch: int) -> tuple[int, ...]:
    """Packed decode rows are padded to powers of two (and max_batch), compiled at warm-up."""
    return tuple(sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)}))


def chunk_buckets(prefill_chunk: int) -> tuple[int, ...]:
    sizes = [b for b in (MIN_CHUNK_BUCKET << i for i in range(32)) if b < prefill_chunk]
    return (*sizes, prefill_chunk)


def _smallest(sizes: tuple[int, ...], n: int) -> int:
    return next(b for b in sizes if n <= b)


class PagedEngine(Engine):
    """The engine over a paged KV cache with prefix caching, on one device.

    max_batch: concurrent sequences (slots). The pool has `num_pages` pages of `page_size`
    positions (page 0 is scratch), or as many as `kv_cache_bytes` holds; by default enough
    for max_batch full-length sequences, GlmEngine's capacity. Its dtype is the weights'.
    `attn_impl`: a paged_attention implementation, chosen per backend when None.
    """

    def __init__(self, cfg: GlmConfig, params: dict, max_batch: int, max_seq_len: int,
                 steps_per_call: int = 4, *, page_size: int = 16, num_pages: int | None = None,
                 kv_cache_bytes: int | None = None, prefill_chunk: int = 512,
                 prefix_caching: bool = True, attn_impl: str | None = None,
                 mesh: Mesh | None = None, rules: Rules | str | None = None):
        if not 0 < max_seq_len <= cfg.max_position_embeddings:
            raise ValueError(f'max_seq_len must be between 1 and the model context of '
                             f'{cfg.max_position_embeddings}, got {max_seq_len}')
        for name, value in (('max_batch', max_batch), ('steps_per_call', steps_per_call),
                            ('prefill_chunk', prefill_chunk), ('page_size', page_size)):
            if value < 1:
                raise ValueError(f'{name} must be >= 1, got {value}')
        self.cfg, self.params = cfg, params
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_size, self.steps_per_call = cfg.vocab_size, steps_per_call
        self.prefill_chunk, self.page_size = prefill_chunk, page_size
        self.prefix_caching = prefix_caching
        self.dtype = jnp.dtype(params['model']['embed'].dtype)
        self.num_pages = self._pool_size(num_pages, kv_cache_bytes)
        self.max_pages_per_seq = pages_for(max_seq_len, page_size)
        self.buckets = buckets(max_seq_len)  # embed's padded prompt lengths
        self.row_buckets = row_buckets(max_batch)
        self.chunk_buckets = chunk_buckets(prefill_chunk)
        mesh = make_mesh({}, jax.devices()[:1]) if mesh is None else mesh
        if mesh.size > 1 and attn_impl is None:
            # The Pallas kernels would need a shard_map over kv heads; the reference is
            # partitioned by the compiler.
            attn_impl = 'reference'
        self.attn_impl = attn_impl
        self.layout = Layout(cfg, mesh, get_rules(rules), self.dtype)
        pages = jax.eval_shape(lambda: init_pages(cfg, self.num_pages, page_size, self.dtype))
        self._pages_sharding = pages_shardings(cfg, mesh, pages, self.layout.rules)
        self.last_rows = 0  # the row bucket of the last generate call (tests, metrics)
        self._seq_ids = itertools.count()
        self.reset()

    def _pool_size(self, num_pages: int | None, kv_cache_bytes: int | None) -> int:
        if num_pages is not None and kv_cache_bytes is not None:
            raise ValueError('give num_pages or kv_cache_bytes, not both')
        if kv_cache_bytes is not None:
            num_pages = kv_cache_bytes // (self.page_size * kv_bytes_per_token(self.cfg,
                                                                               self.dtype))
        elif num_pages is None:
            num_pages = 1 + self.max_batch * pages_for(self.max_seq_len, self.page_size)
        if num_pages < 2:
            raise ValueError(f'a pool of {num_pages} pages of {self.page_size} tokens: need at '
                             f'least 2 (page 0 is scratch); give more kv_cache_bytes')
        return int(num_pages)

    def reset(self) -> None:
        """A new pool, decode state and page manager: every sequence and cached page gone."""
        with jax.set_mesh(self.layout.mesh):
            # Built in place, shard by shard: no device ever holds the whole pool.
            self.pages = jax.jit(init_pages, static_argnums=(0, 1, 2, 3),
                                 out_shardings=self._pages_sharding)(
                self.cfg, self.num_pages, self.page_size, self.dtype)
            self.state = self._put(_empty_state(self.max_batch, self.vocab_size))
        self.manager = PageManager(self.num_pages, self.page_size, self.max_pages_per_seq,
                                   self.prefix_caching)
        self._slot_seq: list[int | None] = [None] * self.max_batch
        self._bound = np.zeros(self.max_batch, np.int64)  # per slot: a bound of its length
        self._limit = np.zeros(self.max_batch, np.int64)  # per slot: the most it can reach

    def _put(self, tree):
        """Host values onto every device of the mesh (the same values in every process)."""
        return jax.device_put(tree, jax.tree.map(lambda _: self.layout.replicated, tree))

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f'a prompt of {n} tokens exceeds max_seq_len={self.max_seq_len}')

    def prefill(self, tokens: list[int]) -> PagedPrefix:
        n = len(tokens)
        if not 0 < n <= self.max_seq_len:
            raise ValueError(f'a prompt of {n} tokens: need 1 to max_seq_len={self.max_seq_len}')
        seq = next(self._seq_ids)
        cached = self.manager.begin(seq, tokens)
        if cached is None:
            need = pages_for(n - self.manager.cached_prefix(tokens), self.page_size)
            raise OutOfPages(self._short(need, f'a prompt of {n} tokens'))
        table = self.manager.page_table_array([seq], 1)
        try:
            for start in range(cached, n, self.prefill_chunk):
                length = min(self.prefill_chunk, n - start)
                chunk = np.zeros(_smallest(self.chunk_buckets, length), np.int32)
                chunk[:length] = tokens[start:start + length]
                with jax.set_mesh(self.layout.mesh):
                    logits, self.pages = _prefill_chunk(
                        self.cfg, self.attn_impl, self.params, self.pages,
                        *self._put((chunk, np.int32(start), np.int32(length), table)))
        except Exception:
            self.manager.finish(seq)
            raise
        # The pages' K/V is written by calls already queued before any reader's.
        self.manager.commit(seq, tokens)
        # For insert's prompt mask: padded to max_seq_len, one shape to compile.
        padded = np.zeros((1, self.max_seq_len), np.int32)
        padded[0, :n] = tokens
        return PagedPrefix(cache=None, logits=logits, tokens=padded, length=n, seq_id=seq,
                           cached_tokens=cached)

    def insert(self, prefix: PagedPrefix, slot: int, settings: SlotSettings) -> StepOutput:
        try:
            if self._slot_seq[slot] is not None:
                raise ValueError(f'slot {slot} is in use; free it first')
            if len(settings.stop_ids) > MAX_STOP_IDS:
                raise ValueError(f'at most {MAX_STOP_IDS} stop ids, '
                                 f'got {len(settings.stop_ids)}')
            stop = np.full((MAX_STOP_IDS,), -1, np.int32)
            stop[:len(settings.stop_ids)] = settings.stop_ids
            host = (prefix.tokens, np.int32(prefix.length), np.int32(slot),
                    settings.sampling(), np.int32(settings.max_new), stop)
            with jax.set_mesh(self.layout.mesh):
                self.state, out = _insert(self.state, prefix.logits, *self._put(host))
        except Exception:
            self.manager.finish(prefix.seq_id)  # the sequence never got a slot
            raise
        self._slot_seq[slot] = prefix.seq_id
        out = local(out)
        self._bound[slot] = prefix.length
        # A done row rewrites its last position: it never needs more than prompt + max_new.
        self._limit[slot] = min(prefix.length + settings.max_new,
                                self.max_pages_per_seq * self.page_size)
        return out

    def generate(self) -> StepOutput:
        slots = [s for s, seq in enumerate(self._slot_seq) if seq is not None]
        if not slots:
            return self._idle_output()
        return self._decode(slots, _smallest(self.row_buckets, len(slots)))

    def _decode(self, slots: list[int], rows: int) -> StepOutput:
        seqs = [self._slot_seq[s] for s in slots]
        for s, seq in zip(slots, seqs):
            new_len = min(self._bound[s] + self.steps_per_call, self._limit[s])
            if not self.manager.reserve(seq, int(new_len)):
                need = pages_for(int(new_len), self.page_size) - len(self.manager.page_table(seq))
                raise OutOfPages(self._short(need, f'slot {s} growing to {new_len} tokens'))
        padded = np.full(rows, self.max_batch, np.int32)
        padded[:len(slots)] = slots
        table = self.manager.page_table_array(seqs, rows)
        with jax.set_mesh(self.layout.mesh):
            self.pages, self.state, out = _generate(
                self.cfg, self.attn_impl, self.steps_per_call, self.params, self.pages,
                self.state, *self._put((padded, np.array([len(slots)], np.int32), table)))
        out = local(out)
        self._bound[slots] = np.minimum(self._bound[slots] + self.steps_per_call,
                                        self._limit[slots])
        self.last_rows = rows
        return out

    def _idle_output(self) -> StepOutput:
        B, S = self.max_batch, self.steps_per_call
        top = min(TOP_LOGPROBS, self.vocab_size)
        return StepOutput(tokens=np.zeros((B, S), np.int32), valid=np.zeros((B, S), bool),
                          logprobs=np.zeros((B, S), np.float32),
                          top_ids=np.zeros((B, S, top), np.int32),
                          top_logprobs=np.zeros((B, S, top), np.float32),
                          done=np.ones((B,), bool))

    def _short(self, need: int, what: str) -> str:
        return (f'the KV page pool is exhausted: {what} needs {need} pages of '
                f'{self.page_size} tokens, {self.manager.pool.num_free} of '
                f'{self.manager.pool.allocatable} are free (preemption is not implemented '
                f'yet: give more pages, kv_cache_bytes or a smaller max_batch)')

    def free(self, slot: int) -> None:
        seq = self._slot_seq[slot]
        if seq is None:
            return
        self.manager.finish(seq)
        self._slot_seq[slot] = None
        self._bound[slot] = self._limit[slot] = 0
        # The rest of the device row needs no change: a slot out of the batch is neither run
        # nor read, and insert overwrites all of it.
        with jax.set_mesh(self.layout.mesh):
            self.state = _mark_done(self.state, self._put(np.int32(slot)))

    @property
    def capacity(self) -> int:
        return min(self.max_seq_len, self.max_pages_per_seq * self.page_size,
                   (self.num_pages - 1) * self.page_size)

    def can_admit(self, prompt: list[int], max_new: int) -> bool:
        """Admission by worst case: the pages this request could ever need (less its cached
        prefix) plus what every running sequence may still grow into must be free, so a
        decode step never runs out of pages (until preemption replaces this)."""
        need = pages_for(min(len(prompt) + max_new, self.capacity), self.page_size)
        need -= self.manager.cached_prefix(prompt) // self.page_size
        for slot, seq in enumerate(self._slot_seq):
            if seq is not None:
                held = len(self.manager.page_table(seq))
                need += max(0, pages_for(int(self._limit[slot]), self.page_size) - held)
        return need <= self.manager.pool.num_free

    def metrics(self) -> dict[str, float]:
        return {**self.manager.metrics(),
                'num_running_seqs': sum(s is not None for s in self._slot_seq)}

    def embed(self, prompts: list[list[int]]) -> np.ndarray:
        return embed_prompts(self.cfg, self.layout, self.params, prompts, self.bucket,
                             self._put)

    def warmup(self, progress=None) -> None:
        """Compiles every prefill chunk bucket, the insert and every row bucket;
        `progress(done, total)` after each."""
        total = len(self.chunk_buckets) + len(self.row_buckets)
        for i, b in enumerate(self.chunk_buckets):
            # Distinct tokens per bucket: a prefix-cache hit would shorten the chunk.
            self.free_prefix(self.prefill([i % self.vocab_size] * min(b, self.max_seq_len)))
            jax.block_until_ready(self.pages)
            if progress is not None:
                progress(i + 1, total)
        for i, rows in enumerate(self.row_buckets):
            for slot in range(rows):
                self.insert(self.prefill([slot % self.vocab_size]), slot,
                            SlotSettings(max_new=1))
            self._decode(list(range(rows)), rows)
            for slot in range(rows):
                self.free(slot)
            jax.block_until_ready((self.pages, self.state))
            if progress is not None:
                progress(len(self.chunk_buckets) + i + 1, total)
        self.reset()

    def free_prefix(self, prefix: PagedPrefix) -> None:
        """Drops a prefilled sequence that will not be inserted."""
        self.manager.finish(prefix.seq_id)
