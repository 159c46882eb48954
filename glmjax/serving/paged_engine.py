"""`PagedEngine`: the Engine interface over a paged KV cache, so that a step costs what its
active sequences cost, repeated prompt prefixes are not recomputed, a long prompt does not
stall the running streams, and a pool too small for every sequence at once preempts instead
of failing.

What lives where:
- the device holds one page pool per layer (`KVPages`, [K, P, L, H] each) shared by every
  sequence, and per slot the decode state (last token, length, done, sampling rows,
  penalty counts, prompt mask, stop ids, max_new);
- the host holds the bookkeeping (`PageManager`: page tables, reference counts, the prefix
  cache) and decides every page table, so the device never allocates; and per slot the
  tokens it still has to compute and the tokens it generated (fetched two calls late, when
  they are long computed), which a preempted sequence is recomputed from.

The calls, as the orchestrator makes them:
- `prefill(tokens)` begins a sequence on the host only: its longest cached prefix is taken
  by reference (`Prefix.cached_tokens` says how many tokens); nothing is computed yet.
- `insert(prefix, slot, settings)` binds it to a slot (the decode state's row is set) and
  returns no token: the prompt is computed by the next `generate` calls.
- `generate()` runs one device call. While some slot still has prompt tokens to compute it
  is one mixed step, a ragged batch of every decoding slot's next token plus prompt chunks
  (oldest first) up to `max_num_batched_tokens` tokens in all: the running streams advance
  by one token while a long prompt is computed chunk by chunk, and a chunk that ends its
  prompt samples the first token. Otherwise it is `steps_per_call` decode steps of the
  decoding slots. Rows are padded to the smallest of `row_buckets` and tokens to the
  smallest of `token_buckets` (a mixed step has max_batch + 1 rows: what it costs is its
  tokens), all compiled at warm-up: one sequence alone decodes in a 1-row step. Outputs
  are scattered back to [max_batch, steps_per_call]. `generate(masks)` (some request is
  constrained) is one mixed step in two device calls, `_mixed_forward` then
  `_mixed_sample`: masks() is called between them for the token bitmasks, so the host
  computes them from the previous step's tokens while the forward runs.
- `free(slot)` finishes the sequence: its pages are released; the cached ones stay in the
  prefix cache until evicted.
- `embed_begin(prompts)` queues an embedding call: its inputs are computed as prompts are,
  as chunks of the same mixed steps beside the running streams (rows of no slot, over pages
  of their own), and each one's final hidden states are mean-pooled from per-step row sums;
  `embed_results` hands over the calls whose vectors are on the host. An input needs no
  more memory and no other programs than a prompt does, however long it is, and the
  streams decode on while it is computed. `embed(prompts)` is the same in steps of its own,
  blocking (warm-up, tests).

Prompts that share a prefix are not computed side by side: a prompt whose next page an older
prompt has yet to compute waits, and takes the page from the cache once it is written, as
it would have at `prefill` had it come later (agentic conversations that start together all
begin with the same system prompt and tools). A decoding sequence's pages go into the cache
too as they fill (when the host fetches its tokens, and at `free`): the next turn of a
conversation resends the answer, and a preempted sequence is recomputed from its tokens.

Pages are reserved on the host before each call for what every row may write in it. When
the pool is short the newest sequence is preempted, as vLLM does: its pages are released
(the full ones stay cached) and it is recomputed later from its prompt and the tokens it
generated, with its decode state (counts, generated, the next input token) kept, so its
output is the same as if it had never stopped. The oldest sequence is never preempted for a
newer one, so every request finishes. Admission asks only for the pages of a prompt;
`capacity` bounds what one request may ask for in all.

A row that is done on the device (a stop id, its budget) runs on until the
host frees it, neither advancing nor emitting: it rewrites the K/V at its current length, a
position in a page it owns alone, never a shared one (shared pages are full, committed
pages).

With `speculative_tokens` k > 0 a decode call is `steps_per_call` speculative steps
(glmjax/speculative.py): per row, verify its k drafts with one (k+1)-token forward, emit the
accepted run plus one token, draft the next k with the MTP layer, whose pages share the main
pages' tables. Each call may add k + 1 positions per step, so that is what is reserved; the
bound a row's reservation follows is tightened to what it emitted once its tokens are fetched.
Mixed steps run the MTP layer over their positions too (its pages keep up) and leave each row
its drafts, but are single-token steps themselves. A plain decode call (the measured rule, or
speculative_max_batch) writes only the MTP layer's K/V and leaves the drafting to the next
speculative call (SlotState.stale), so it costs about what it costs without speculation.

On a mesh the Pallas kernels run per device over its kv heads (paged_attention._over_heads).
"""

import collections
import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax.cache import kv_bytes_per_token
from glmjax.config import GlmConfig
from glmjax.model import merge
from glmjax.paged_attention import choose_impl, token_positions
from glmjax.paged_inference import KVPages, init_pages, paged_hidden
from glmjax.paged_mtp import init_mtp_pages, paged_mtp_hidden, write_mtp_kv
from glmjax.sampling import TOP_LOGPROBS, SamplingParams
from glmjax.serving.engine import (
    MAX_STOP_IDS,
    Engine,
    Layout,
    Prefix,
    SlotSettings,
    StepOutput,
    choose,
    local,
)
from glmjax.serving.kv_pages import OutOfPages, PageManager, pages_for
from glmjax.sharding.compiled import full_depth, memory_sizes, truncated
from glmjax.sharding.mesh import make_mesh
from glmjax.sharding.rules import (
    Rules,
    bytes_per_device,
    get_rules,
    pages_shardings,
    with_shardings,
)
from glmjax.speculative import SpecRows, draft, redraft, speculative_step
from glmjax.token_mask import bitmask_words

MIN_TOKEN_BUCKET = 16  # a mixed step's tokens are padded to powers of two from here
# Without num_pages or kv_cache_bytes, on devices that report their memory: the pool takes
# this share of each device's memory, less what is in use (the weights) and the largest
# program's temporaries, compiled (vLLM's gpu_memory_utilization, whose default this is; the
# rest is a margin for what the compiler's analysis does not see).
KV_MEMORY_FRACTION = 0.9
# max_num_batched_tokens=None: the budget is measured at warm-up, among the token buckets
# from max_batch up to this; each step timed this many times after a first run, the fastest
# kept (what else runs on the host only adds time).
MAX_MEASURED_BUDGET = 8192
BUDGET_TIMINGS = 3
# Speculation's measured rule (speculative_max_batch None): the weight of each fetched
# call in the estimate of the tokens a verify step emits per row, and how many decode calls
# in a row go plain on that estimate before one speculates again to renew it.
SPEC_EMA = 0.25
SPEC_PROBE_EVERY = 16


def device_memory(devices) -> list[tuple[int, int]] | None:
    """(bytes_limit, bytes_in_use) of each device; None if one does not say (a CPU)."""
    stats = [d.memory_stats() for d in devices]
    if not all(s and 'bytes_limit' in s for s in stats):
        return None
    return [(int(s['bytes_limit']), int(s.get('bytes_in_use', 0))) for s in stats]


@struct.dataclass
class SlotState(SpecRows):
    """Per-slot decode state, [B] = [max_batch] rows: what sampling reads and advances, plus
    each slot's drafts ([B, k], k = 0 without speculation), which is what a speculative step
    reads and returns. A plain decode call of a speculating engine writes only the MTP
    layer's K/V; it leaves its last pair's main hidden state (after the final norm) and
    marks the drafts stale, and the next speculative call drafts from that pair first."""
    pair_hidden: jax.Array  # [B, D] (D = 0 without speculation)
    stale: jax.Array  # [B] bool


@dataclasses.dataclass
class _Filling:
    """A slot's tokens whose K/V is not all computed: `done` of them are. `first`: the last
    chunk samples the request's first token (a new prompt); otherwise the sequence is being
    recomputed after a preemption and its next input token is in the decode state."""
    tokens: list[int]
    done: int
    first: bool


@dataclasses.dataclass
class _Embedding:
    """An embedding call as the engine computes it: per input its tokens computed so far
    and, while it is computed, its pages; per step that ran some of its inputs, the step's
    row sums [R, D] on the device and which input each of the call's rows holds."""
    inputs: list[list[int]]
    done: list[int]
    pages: list[list[int] | None]
    order: int  # its age among the prompts being computed (`_admitted`)
    sums: list[tuple[jax.Array, list[tuple[int, int]]]] = dataclasses.field(
        default_factory=list)

    @property
    def computed(self) -> bool:
        return all(d == len(p) for d, p in zip(self.done, self.inputs))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _empty_state(batch: int, vocab: int, num_drafts: int, hidden: int, dtype) -> SlotState:
    B, V = batch, vocab
    return SlotState(
        pair_hidden=jnp.zeros((B, hidden if num_drafts else 0), dtype),
        stale=jnp.zeros((B,), bool),
        tokens=jnp.zeros((B,), jnp.int32), lengths=jnp.zeros((B,), jnp.int32),
        done=jnp.ones((B,), bool), generated=jnp.zeros((B,), jnp.int32),
        max_new=jnp.zeros((B,), jnp.int32), stop_ids=jnp.full((B, MAX_STOP_IDS), -1, jnp.int32),
        counts=jnp.zeros((B, V), jnp.int32), prompt_mask=jnp.zeros((B, V), bool),
        sampling=jax.tree.map(jnp.asarray, SamplingParams.make(B)),
        drafts=jnp.zeros((B, num_drafts), jnp.int32))


@functools.partial(jax.jit, static_argnums=0, donate_argnames='state')
def _bind(vocab: int, state: SlotState, tokens: jax.Array, length: jax.Array, slot: jax.Array,
          row: SamplingParams, max_new: jax.Array, stop_ids: jax.Array) -> SlotState:
    """A new request's decode row: nothing generated yet, its prompt's tokens in the mask.
    tokens [1, max_seq_len] padded past length."""
    real = jnp.arange(tokens.shape[1]) < length
    mask = jnp.zeros((vocab,), bool).at[jnp.where(real, tokens[0], vocab)].set(True,
                                                                              mode='drop')
    return state.replace(
        tokens=state.tokens.at[slot].set(0), lengths=state.lengths.at[slot].set(0),
        done=state.done.at[slot].set(False), generated=state.generated.at[slot].set(0),
        max_new=state.max_new.at[slot].set(max_new), stop_ids=state.stop_ids.at[slot].set(stop_ids),
        counts=state.counts.at[slot].set(0), prompt_mask=state.prompt_mask.at[slot].set(mask),
        sampling=jax.tree.map(lambda a, r: a.at[slot].set(r[0]), state.sampling, row))


def _scatter_outputs(state: SlotState, slots: jax.Array, outs: StepOutput) -> StepOutput:
    """Row outputs [R, steps, ...] -> [max_batch, steps, ...]; padding rows (slot B) dropped."""
    B = state.tokens.shape[0]
    full = jax.tree.map(lambda x: jnp.zeros((B,) + x.shape[1:], x.dtype)
                        .at[slots].set(x, mode='drop'), outs)
    return full.replace(done=state.done)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3),
                   donate_argnames=('pages', 'mtp_pages', 'state'))
def _generate(cfg: GlmConfig, attn_impl: str | None, steps: int, num_drafts: int, params: dict,
              pages: KVPages, mtp_pages: KVPages | None, state: SlotState, slots: jax.Array,
              num_seqs: jax.Array, page_indices: jax.Array
              ) -> tuple[KVPages, KVPages | None, SlotState, StepOutput]:
    """`steps` decode steps of the R packed rows: slots [R] i32 (padding rows: max_batch),
    num_seqs [1] live rows, page_indices [R, M]. Returns outputs [max_batch, steps].
    num_drafts > 0 (an engine that speculates, on a call it decodes plainly): each step writes
    its position's MTP K/V, so the MTP pages are current when speculation resumes, and the
    rows keep their last pair for the drafts (SlotState.stale): a plain call thus costs
    little more than in an engine that never speculates."""
    R = slots.shape[0]
    live = jnp.arange(R) < num_seqs[0]
    rows = jax.tree.map(lambda x: jnp.take(x, slots, axis=0, mode='clip'), state)  # [R, ...]
    cu_q_lens = jnp.arange(R + 1, dtype=jnp.int32)  # one token per row

    def step(carry, _):
        pages, mtp_pages, rows = carry
        active = live & ~rows.done
        # Each row writes its last token at its length, then attends over length + 1.
        h, pages = paged_hidden(cfg, params, rows.tokens, rows.lengths, pages, rows.lengths + 1,
                                page_indices, cu_q_lens, num_seqs, attn_impl=attn_impl)
        out, counts, generated = choose(merge(cfg, params).logits(h), rows.sampling,
                                         rows.counts, rows.prompt_mask, rows.generated,
                                         rows.max_new, rows.stop_ids, active)
        tokens = jnp.where(active, out.tokens, rows.tokens)
        if num_drafts:  # the MTP pair of this position (the last step's is kept to draft)
            mtp_pages = write_mtp_kv(cfg, params, h, tokens, rows.lengths, mtp_pages,
                                     rows.lengths + 1, page_indices, cu_q_lens, num_seqs)
            rows = rows.replace(pair_hidden=h.astype(rows.pair_hidden.dtype))
        rows = rows.replace(tokens=tokens, lengths=rows.lengths + active,
                            done=rows.done | out.done, counts=counts, generated=generated)
        return (pages, mtp_pages, rows), out

    (pages, mtp_pages, rows), outs = jax.lax.scan(step, (pages, mtp_pages, rows), None,
                                                  length=steps)
    if num_drafts:  # drafting waits for a speculative call (`_speculate` runs `redraft`)
        rows = rows.replace(stale=jnp.ones_like(rows.stale))
    state = jax.tree.map(lambda big, r: big.at[slots].set(r, mode='drop'), state, rows)
    outs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)  # [R, steps, ...]
    return pages, mtp_pages, state, _scatter_outputs(state, slots, outs)


def _ragged(state: SlotState, tokens: jax.Array, slots: jax.Array, cu_q_lens: jax.Array,
            chunk_start: jax.Array, decoding: jax.Array, num_seqs: jax.Array):
    """A mixed step's layout: each row's state, whether it is live, its query and KV
    lengths; per token [T] its position and input (a decode row's is its last token, from
    the decode state); and each row's last token's index."""
    R, T = slots.shape[0], tokens.shape[0]
    rows = jax.tree.map(lambda x: jnp.take(x, slots, axis=0, mode='clip'), state)
    start = jnp.where(decoding, rows.lengths, chunk_start)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    kv_lens = start + q_lens
    row, positions, valid = token_positions(kv_lens, cu_q_lens, num_seqs, T)
    tokens = jnp.where(valid & decoding[row], rows.tokens[row], tokens)
    live = jnp.arange(R) < num_seqs[0]
    last = jnp.clip(cu_q_lens[1:] - 1, 0, T - 1)  # [R]: each row's last token
    return rows, live, q_lens, kv_lens, positions, tokens, last


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnames='pages')
def _mixed_forward(cfg: GlmConfig, attn_impl: str | None, num_drafts: int, params: dict,
                   pages: KVPages, state: SlotState, tokens: jax.Array, slots: jax.Array,
                   cu_q_lens: jax.Array, chunk_start: jax.Array, decoding: jax.Array,
                   num_seqs: jax.Array, page_indices: jax.Array
                   ) -> tuple[KVPages, jax.Array, jax.Array]:
    """The model half of one ragged step of decode rows (one token each, taken from the
    decode state) and prompt chunks (tokens [T] from the host, at chunk_start [R]);
    decoding [R]: a decode row. Returns the pages, the final hidden states [T, D] (for the
    MTP layer and embeddings) and each row's last logits [R, V]. `_mixed_sample` is the rest:
    two calls, so that a host filling token masks from the previous step's tokens does it
    while this one runs."""
    _, _, _, kv_lens, positions, tokens, last = _ragged(state, tokens, slots, cu_q_lens,
                                                        chunk_start, decoding, num_seqs)
    h, pages = paged_hidden(cfg, params, tokens, positions, pages, kv_lens, page_indices,
                            cu_q_lens, num_seqs, attn_impl=attn_impl)
    return pages, h, merge(cfg, params).logits(h[last])


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3),
                   donate_argnames=('mtp_pages', 'state'))
def _mixed_sample(cfg: GlmConfig, attn_impl: str | None, steps: int, num_drafts: int,
                  params: dict, mtp_pages: KVPages | None, state: SlotState,
                  h: jax.Array, logits: jax.Array, tokens: jax.Array, slots: jax.Array,
                  cu_q_lens: jax.Array, chunk_start: jax.Array, decoding: jax.Array,
                  first: jax.Array, follow: jax.Array, num_seqs: jax.Array,
                  page_indices: jax.Array, allowed: jax.Array
                  ) -> tuple[KVPages | None, SlotState, StepOutput]:
    """The sampling half of `_mixed_forward`'s step, over the same inputs. first [R]: a chunk
    that ends a new prompt, which samples the first token; follow [R]: the token after a
    chunk that does not end its tokens (-1 otherwise); allowed [R, ceil(V / 32)]: each row's
    constrained-decoding bitmask (all ones: free). Outputs are [max_batch, steps] with only
    the first step's tokens valid.

    With num_drafts = k > 0 the MTP layer runs over the step's positions too (each with the
    token after it: the next one in the chunk, `follow`, the token just sampled, or for a
    recomputed sequence's last chunk its pending input), so its pages keep up with the main
    ones, and each row gets k drafts for the speculative steps that follow."""
    R, T = slots.shape[0], tokens.shape[0]
    rows, live, q_lens, kv_lens, positions, tokens, last = _ragged(
        state, tokens, slots, cu_q_lens, chunk_start, decoding, num_seqs)
    active = live & ((decoding & ~rows.done) | first)
    out, counts, generated = choose(logits, rows.sampling, rows.counts, rows.prompt_mask,
                                     rows.generated, rows.max_new, rows.stop_ids, active,
                                     allowed)
    drafts = rows.drafts
    if num_drafts:
        after = jnp.where(active, out.tokens, jnp.where(follow >= 0, follow, rows.tokens))
        ends = jnp.where(live & (q_lens > 0), last, T)
        nxt = jnp.roll(tokens, -1).at[ends].set(after, mode='drop')
        g, mtp_pages = paged_mtp_hidden(cfg, params, h, nxt, positions, mtp_pages, kv_lens,
                                        page_indices, cu_q_lens, num_seqs, attn_impl=attn_impl)
        drafts, mtp_pages = draft(cfg, params, mtp_pages, g[last], kv_lens - 1, page_indices,
                                  num_seqs, num_drafts, attn_impl=attn_impl)
    rows = rows.replace(tokens=jnp.where(active, out.tokens, rows.tokens),
                        lengths=jnp.where(decoding, rows.lengths + active, kv_lens),
                        done=rows.done | out.done, counts=counts, generated=generated,
                        drafts=drafts, stale=jnp.zeros_like(rows.stale))
    state = jax.tree.map(lambda big, r: big.at[slots].set(r, mode='drop'), state, rows)
    pad = lambda x: jnp.zeros((R, steps) + x.shape[1:], x.dtype).at[:, 0].set(x)  # noqa: E731
    return mtp_pages, state, _scatter_outputs(state, slots, jax.tree.map(pad, out))


@functools.partial(jax.jit, static_argnums=(0, 1, 2),
                   donate_argnames=('pages', 'mtp_pages', 'state'))
def _speculate(cfg: GlmConfig, attn_impl: str | None, steps: int, params: dict, pages: KVPages,
               mtp_pages: KVPages, state: SlotState, slots: jax.Array, num_seqs: jax.Array,
               page_indices: jax.Array
               ) -> tuple[KVPages, KVPages, SlotState, StepOutput, jax.Array]:
    """`steps` speculative steps (glmjax/speculative.py) of the R packed rows, as `_generate`
    takes them: each verifies a row's k drafts and emits 1..k+1 tokens. Returns outputs
    [max_batch, steps * (k + 1)], each row's emitted tokens first, in order, and the drafts
    each step accepted, [max_batch, steps] (-1: the row did not decode)."""
    R, B = slots.shape[0], state.tokens.shape[0]
    rows = jax.tree.map(lambda x: jnp.take(x, slots, axis=0, mode='clip'), state)
    # A done row needs no drafts, and its last pair would overwrite the one before it.
    stale = rows.stale & ~rows.done & (jnp.arange(R) < num_seqs[0])

    def fresh(mtp_pages):  # after plain calls: the drafts of their last pairs
        drafts, mtp_pages = redraft(cfg, params, mtp_pages, rows.pair_hidden, rows.tokens,
                                    rows.lengths, stale, page_indices, num_seqs,
                                    rows.drafts.shape[1], attn_impl=attn_impl)
        return jnp.where(stale[:, None], drafts, rows.drafts), mtp_pages

    # Taken only after plain calls; there XLA copies the MTP pool (its conditional's buffers),
    # a pool of one layer.
    drafts, mtp_pages = jax.lax.cond(jnp.any(stale), fresh, lambda m: (rows.drafts, m),
                                     mtp_pages)
    rows = rows.replace(drafts=drafts, stale=jnp.zeros_like(stale))

    def step(carry, _):
        pages, mtp_pages, rows = carry
        pages, mtp_pages, rows, out = speculative_step(cfg, params, pages, mtp_pages, rows,
                                                       page_indices, num_seqs,
                                                       attn_impl=attn_impl)
        return (pages, mtp_pages, rows), out

    (pages, mtp_pages, rows), outs = jax.lax.scan(step, (pages, mtp_pages, rows), None,
                                                  length=steps)
    state = jax.tree.map(lambda big, r: big.at[slots].set(r, mode='drop'), state, rows)
    flat = lambda x: jnp.swapaxes(x, 0, 1).reshape(R, -1, *x.shape[3:])  # noqa: E731
    valid = flat(outs.valid)  # [R, steps * (k + 1)]
    order = jnp.argsort(~valid, axis=1, stable=True)  # the emitted ones first, in order

    def pick(x):
        x = flat(x)
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    emitted = StepOutput(tokens=pick(outs.tokens), valid=pick(outs.valid),
                         logprobs=pick(outs.logprobs), top_ids=pick(outs.top_ids),
                         top_logprobs=pick(outs.top_logprobs), done=rows.done)
    accepted = jnp.where(outs.valid.any(axis=2), outs.accepted, -1).T  # [R, steps]
    accepted = jnp.full((B, steps), -1, jnp.int32).at[slots].set(accepted, mode='drop')
    return pages, mtp_pages, state, _scatter_outputs(state, slots, emitted), accepted


@functools.partial(jax.jit, donate_argnames='state')
def _mark_done(state: SlotState, slot: jax.Array) -> SlotState:
    return state.replace(done=state.done.at[slot].set(True))


@functools.partial(jax.jit, static_argnums=0)
def _sum_rows(layout: Layout, h: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array
              ) -> jax.Array:
    """Each row's sum of its tokens' hidden states (h [T, D], the rows' tokens packed as
    cu_q_lens [R + 1] says): [R, D] fp32, on every device."""
    R = cu_q_lens.shape[0] - 1
    row, _, valid = token_positions(cu_q_lens[1:], cu_q_lens, num_seqs, h.shape[0])
    sums = jax.ops.segment_sum(jnp.where(valid[:, None], h.astype(jnp.float32), 0), row,
                               num_segments=R)
    return jax.lax.with_sharding_constraint(sums, layout.replicated)


def _as_returned(sharding: NamedSharding) -> NamedSharding:
    """The sharding as a jitted program returns it, without trailing Nones: a pool made with
    it is the same input to a program as the pool a step returns, not a second compile of
    every program its first call after `reset` makes."""
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def row_buckets(max_batch: int) -> tuple[int, ...]:
    """Packed rows are padded to powers of two (and max_batch), compiled at warm-up."""
    return tuple(sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)}))


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    sizes = [b for b in (MIN_TOKEN_BUCKET << i for i in range(32)) if b < max_tokens]
    return (*sizes, max_tokens)


def _smallest(sizes: tuple[int, ...], n: int) -> int:
    return next(b for b in sizes if n <= b)


def choose_budget(decode_s: float, mixed_s: Callable[[int], float],
                  sizes: tuple[int, ...]) -> int:
    """The token budget: the largest of `sizes` (ascending) whose mixed step costs at most a
    decode call (`decode_s`), so that a running stream's gap while a prompt is computed stays
    about its gap without one (Sarathi-Serve's budget, from the step time one pays). A
    step's cost grows with its tokens: the sizes after the first are timed in order
    (`mixed_s(T)`, seconds) up to the first that costs more. The first size at least."""
    budget = sizes[0]
    for T in sizes[1:]:
        if mixed_s(T) > decode_s:
            break
        budget = T
    return budget


def chunk_stop(start: int, budget: int, context_tokens: float | None) -> int:
    """Where a prompt chunk from position `start` ends within `budget` budget tokens, where
    a token at context c counts 1 + c / context_tokens (None: 1): deep in a long prompt a
    step takes fewer of its tokens, so that it costs about what the budget's step costs at
    the prompt's start. At least MIN_TOKEN_BUCKET tokens (or the budget), so that a prompt
    always advances."""
    if context_tokens is None:
        return start + budget
    tokens = int(budget * context_tokens / (context_tokens + start))
    return start + max(tokens, min(budget, MIN_TOKEN_BUCKET))


def chunk_cost(start: int, stop: int, context_tokens: float | None) -> int:
    """The budget tokens of a chunk of positions start..stop, as `chunk_stop` counts them."""
    if context_tokens is None:
        return stop - start
    return math.ceil((stop - start) * (1 + start / context_tokens))


class PagedEngine(Engine):
    """The engine over a paged KV cache with prefix caching and preemption.

    max_batch: concurrent sequences (slots). The pool has `num_pages` pages of `page_size`
    positions (page 0 is scratch), or as many as `kv_cache_bytes` holds (whole tokens' K/V,
    over all devices); by default, on devices that report their memory (GPU, TPU), as many
    as fit in KV_MEMORY_FRACTION of each device's memory less what is in use (the weights)
    and the temporaries of the largest programs (`_temporaries`, `temp_bytes`), else enough
    for max_batch full-length sequences. Its dtype is the weights'.
    max_num_batched_tokens: tokens per mixed step (decode rows plus prompt chunks), at least
    max_batch; None: measured by `warmup` (`choose_budget` on the token buckets from
    max_batch up to max_seq_len and MAX_MEASURED_BUDGET; until then the smallest), and a
    prompt token then counts more the deeper it is in its prompt (`_measure_context`).
    `attn_impl`: a paged_attention implementation, chosen per backend when None.
    speculative_tokens: k > 0 decodes with MTP speculation, k drafts per step (the checkpoint
    must have its MTP layer); its pages come out of the same pool budget.
    speculative_max_batch: a decode call with more running sequences than this is plain
    (verifying k + 1 tokens per row no longer pays once a step is compute-bound); the MTP
    layer still follows it, so drafts are current when the load falls. None: measured
    (`_measure_speculation`): `warmup` times a speculative and a plain call of each row
    bucket, and a call speculates while the tokens a verify step has been emitting per row
    (estimated from the fetched calls, SPEC_EMA; the first calls speculate) are at least the
    two calls' ratio of seconds; after SPEC_PROBE_EVERY plain calls one speculates to renew
    the estimate. Until warmup, always.
    """

    def __init__(self, cfg: GlmConfig, params: dict, max_batch: int, max_seq_len: int,
                 steps_per_call: int = 4, *, page_size: int = 16, num_pages: int | None = None,
                 kv_cache_bytes: int | None = None, max_num_batched_tokens: int | None = 512,
                 prefix_caching: bool = True, attn_impl: str | None = None,
                 speculative_tokens: int = 0, speculative_max_batch: int | None = None,
                 mesh: Mesh | None = None, rules: Rules | str | None = None):
        if not 0 < max_seq_len <= cfg.max_position_embeddings:
            raise ValueError(f'max_seq_len must be between 1 and the model context of '
                             f'{cfg.max_position_embeddings}, got {max_seq_len}')
        for name, value in (('max_batch', max_batch), ('steps_per_call', steps_per_call),
                            ('page_size', page_size)):
            if value < 1:
                raise ValueError(f'{name} must be >= 1, got {value}')
        if speculative_tokens < 0:
            raise ValueError(f'speculative_tokens must be >= 0, got {speculative_tokens}')
        if speculative_tokens and 'mtp' not in params:
            raise ValueError('speculative decoding drafts with the MTP layer, and this '
                             'checkpoint has none (its config.json says '
                             f'num_nextn_predict_layers={cfg.num_nextn_predict_layers})')
        self.measures_budget = max_num_batched_tokens is None
        if self.measures_budget:
            max_num_batched_tokens = self._budget_sizes(max_batch, max_seq_len)[0]
        if max_num_batched_tokens < max_batch:
            raise ValueError(f'max_num_batched_tokens must be at least max_batch={max_batch} '
                             f'(a step holds one token of every running sequence), got '
                             f'{max_num_batched_tokens}')
        self.cfg, self.params = cfg, params
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_size, self.steps_per_call = cfg.vocab_size, steps_per_call
        self.max_num_batched_tokens, self.page_size = max_num_batched_tokens, page_size
        self.prefix_caching = prefix_caching
        self.num_drafts = speculative_tokens
        self.spec_max_batch = max_batch if speculative_max_batch is None else \
            speculative_max_batch
        self.measures_speculation = bool(speculative_tokens) and speculative_max_batch is None
        # Per row bucket, a speculative call's seconds over a plain one's (warmup): the tokens
        # per row a verify step must emit to pay; and the estimate of what one does.
        self.spec_cost: dict[int, float] = {}
        self.spec_emitted: float | None = None  # None: no verify step fetched yet
        self.spec_calls = {'speculative': 0, 'plain': 0}  # decode calls of each kind
        self._plain_run = 0  # plain decode calls in a row (the probe reads it)
        # A decode call's most new positions per sequence: every step may emit k + 1.
        self.call_tokens = steps_per_call * (speculative_tokens + 1)
        self.dtype = jnp.dtype(params['model']['embed'].dtype)
        mesh = make_mesh({}, jax.devices()[:1]) if mesh is None else mesh
        self.layout = Layout(mesh, get_rules(rules))
        self.max_pages_per_seq = pages_for(max_seq_len, page_size)
        self.row_buckets = row_buckets(max_batch)
        # A mixed step's rows: one per slot, and one more, so that an embedding input (a
        # chunk of no slot) has a row even while every slot decodes.
        self.mixed_rows = max_batch + 1
        self.token_buckets = token_buckets(max_num_batched_tokens)
        # Chosen here, not from the step's shape: a mixed step's rows hold chunks, so it
        # must never get the decode-only kernel, even with fewer tokens than rows.
        self.decode_impl = attn_impl or choose_impl(1, 1)
        self.mixed_impl = attn_impl or choose_impl(2, 1)
        one = jax.eval_shape(lambda: init_pages(cfg, 1, page_size, self.dtype))
        spec = pages_shardings(cfg, mesh, one, self.layout.rules).k[0].spec
        self.heads_axis = spec[0] if len(spec) else None  # where the rules put the kv heads
        # Per device, what the largest programs need beside their arguments, where the pool
        # is sized from the devices' memory (`_temporaries`); None: not asked.
        self.temp_bytes: int | None = None
        self.num_pages = self._pool_size(num_pages, kv_cache_bytes)
        pages = jax.eval_shape(lambda: init_pages(cfg, self.num_pages, page_size, self.dtype))
        self._pages_sharding = jax.tree.map(_as_returned, pages_shardings(
            cfg, mesh, pages, self.layout.rules)).replace(heads_axis=self.heads_axis)
        mtp = jax.eval_shape(lambda: init_mtp_pages(cfg, self.num_pages, page_size, self.dtype))
        self._mtp_sharding = jax.tree.map(_as_returned, pages_shardings(
            cfg, mesh, mtp, self.layout.rules)).replace(heads_axis=self.heads_axis)
        # What speculation did, from the fetched outputs: vLLM's spec_decode counters.
        self.spec_totals = {'num_drafts': 0, 'num_draft_tokens': 0, 'num_accepted_tokens': 0}
        self.spec_accepted_per_pos = np.zeros(speculative_tokens, np.int64)
        self.last_rows = 0  # the row bucket of the last device call (tests, metrics)
        self.last_tokens = 0  # the token bucket of the last mixed step
        # What warmup measured for the budget: a decode call's and each mixed step's seconds,
        # and each step's over the decode call timed beside it.
        self.budget_timings: dict[str, float] = {}
        self.budget_ratios: dict[int, float] = {}
        # With a measured budget, a chunk's token at context c counts 1 + c / context_tokens
        # of it (`chunk_stop`): a step's attention grows with its chunks' context, and the
        # budget was measured at context 0. None: every token counts 1.
        self.context_tokens: float | None = None
        self._seq_ids = itertools.count()
        self._embed_ids = itertools.count()  # the same on every process: calls name them
        self._all_allowed: dict[int, jax.Array] = {}
        self.reset()

    @staticmethod
    def _budget_sizes(max_batch: int, max_seq_len: int) -> tuple[int, ...]:
        """The budgets warmup may choose: token buckets that hold a token of every row, up to
        one whole prompt (more only helps when several prompts are computed at once)."""
        sizes = tuple(b for b in token_buckets(MAX_MEASURED_BUDGET)
                      if max_batch <= b <= max_seq_len)
        return sizes or (max_batch,)

    def _pool_size(self, num_pages: int | None, kv_cache_bytes: int | None) -> int:
        if num_pages is not None and kv_cache_bytes is not None:
            raise ValueError('give num_pages or kv_cache_bytes, not both')
        if kv_cache_bytes is not None:
            per_token = kv_bytes_per_token(self.cfg, self.dtype)
            if self.num_drafts:  # the MTP layer's pages: one layer more
                per_token += per_token // self.cfg.num_hidden_layers
            num_pages = kv_cache_bytes // (self.page_size * per_token)
        elif num_pages is None:
            num_pages = self._pages_in_memory()
            if num_pages is None:
                num_pages = 1 + self.max_batch * pages_for(self.max_seq_len, self.page_size)
        if num_pages < 2:
            raise ValueError(f'a pool of {num_pages} pages of {self.page_size} tokens: need at '
                             f'least 2 (page 0 is scratch); give more kv_cache_bytes')
        return int(num_pages)

    def _pages_in_memory(self) -> int | None:
        """The pages that fit in KV_MEMORY_FRACTION of each device's memory less what it
        uses and the largest program's temporaries, the same on every process (the
        smallest); None where devices do not say."""
        mesh = self.layout.mesh
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        memory = device_memory(local)
        if memory is None:
            return None
        self.temp_bytes = self._temporaries()
        free = min(int(KV_MEMORY_FRACTION * limit) - used for limit, used in memory)
        free -= self.temp_bytes
        # One page of every pool (the MTP layer's too), as the rules shard it on a device.
        inits = (init_pages, init_mtp_pages) if self.num_drafts else (init_pages,)
        page = 0
        for init in inits:
            one = jax.eval_shape(functools.partial(init, self.cfg, 1, self.page_size, self.dtype))
            page += bytes_per_device(with_shardings(
                one, pages_shardings(self.cfg, mesh, one, self.layout.rules)))
        pages = max(free, 0) // page
        if jax.process_count() > 1:  # lockstep: every process the same pool
            from jax.experimental import multihost_utils
            pages = int(np.min(multihost_utils.process_allgather(np.int64(pages))))
        if pages < 2:
            raise ValueError(f'no room for KV pages: {KV_MEMORY_FRACTION:.0%} of a device\'s '
                             f'memory less the {max(u for _, u in memory):,} bytes in use '
                             f'and the {self.temp_bytes:,} bytes of the largest step\'s '
                             f'temporaries leaves {free:,} bytes, and a page takes {page:,} '
                             f'on a device; give --kv_cache_gb (kv_cache_bytes), a smaller '
                             f'--max_num_batched_tokens or --max_batch, or more devices')
        return int(pages)

    def _temporaries(self) -> int:
        """Per-device bytes the engine's programs need beside their arguments at their
        largest: the mixed step of the most tokens it may take (its forward's temporaries
        and outputs, then its sampling's beside those outputs) and the decode calls of
        max_batch rows, plain and speculative; the most of these. From XLA's memory
        analysis of each program compiled against abstract inputs (nothing is allocated),
        the model cut to a few layers and extrapolated to its depth (full_depth). The pools
        are donated and written in place, so a pool of 2 pages stands for any."""
        B, M, k = self.max_batch, self.max_pages_per_seq, self.num_drafts
        T = (self._budget_sizes(B, self.max_seq_len)[-1] if self.measures_budget
             else self.max_num_batched_tokens)
        mesh, rules, replicated = self.layout.mesh, self.layout.rules, self.layout.replicated

        def like(tree, sharding=None):
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=sharding or x.sharding), tree)

        def host(shape, dtype=jnp.int32):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

        state = like(jax.eval_shape(functools.partial(
            _empty_state, B, self.vocab_size, k, self.cfg.hidden_size, self.dtype)), replicated)
        rows = (host((B,)), host((1,)), host((B, M)))  # slots, num_seqs, page table
        R = self.mixed_rows
        ragged = (host((T,)), host((R,)), host((R + 1,)), host((R,)), host((R,), bool))

        def sizes_at(n: int) -> dict[str, int]:
            cfg, params = truncated(self.cfg, n, like(self.params))

            def pool(init):
                shapes = jax.eval_shape(functools.partial(init, cfg, 2, self.page_size,
                                                          self.dtype, self.heads_axis))
                return with_shardings(shapes, pages_shardings(cfg, mesh, shapes, rules))

            pages, mtp = pool(init_pages), pool(init_mtp_pages) if k else None
            with jax.set_mesh(mesh):
                lowered = _mixed_forward.lower(cfg, self.mixed_impl, k, params, pages, state,
                                               *ragged, host((1,)), host((R, M)))
                _, h, logits = like(lowered.out_info, replicated)
                forward = memory_sizes(lowered)
                sample = memory_sizes(_mixed_sample.lower(
                    cfg, self.mixed_impl, self.steps_per_call, k, params, mtp, state, h,
                    logits, *ragged, host((R,), bool), host((R,)), host((1,)), host((R, M)),
                    host((R, bitmask_words(self.vocab_size)))))
                calls = [memory_sizes(_generate.lower(cfg, self.decode_impl,
                                                      self.steps_per_call, k, params, pages,
                                                      mtp, state, *rows))]
                if k:
                    calls.append(memory_sizes(_speculate.lower(
                        cfg, self.decode_impl, self.steps_per_call, params, pages, mtp, state,
                        *rows)))
            return {'forward': forward['temp'] + forward['outputs'],
                    'sample': forward['outputs'] + sample['temp'] + sample['outputs'],
                    **{f'decode {i}': c['temp'] + c['outputs'] for i, c in enumerate(calls)}}

        return max(full_depth(self.cfg, sizes_at)[0].values())

    def reset(self) -> None:
        """A new pool, decode state and page manager: every sequence and cached page gone."""
        with jax.set_mesh(self.layout.mesh):
            # Built in place, shard by shard: no device ever holds the whole pool.
            self.pages = jax.jit(init_pages, static_argnums=(0, 1, 2, 3, 4),
                                 out_shardings=self._pages_sharding)(
                self.cfg, self.num_pages, self.page_size, self.dtype, self.heads_axis)
            self.mtp_pages = None if not self.num_drafts else jax.jit(
                init_mtp_pages, static_argnums=(0, 1, 2, 3, 4),
                out_shardings=self._mtp_sharding)(
                self.cfg, self.num_pages, self.page_size, self.dtype, self.heads_axis)
            self.state = self.layout.put(_empty_state(self.max_batch, self.vocab_size,
                                                      self.num_drafts, self.cfg.hidden_size,
                                                      self.dtype))
        self.manager = PageManager(self.num_pages, self.page_size, self.max_pages_per_seq,
                                   self.prefix_caching)
        B = self.max_batch
        self._in_use = [False] * B  # a request holds the slot (insert to free)
        self._slot_seq: list[int | None] = [None] * B  # its pages (None: preempted)
        self._admitted = [0] * B  # admission order: the newest is preempted first
        self._prompt: list[list[int]] = [[] for _ in range(B)]
        self._filling: list[_Filling | None] = [None] * B
        self._history: list[list[int]] = [[] for _ in range(B)]  # generated, fetched
        self._binding = [0] * B  # which request a slot's pending outputs belong to
        self._cached = [0] * B  # per slot: prompt tokens taken from the prefix cache
        self._embeddings: dict[int, _Embedding] = {}  # by id, oldest first, until handed over
        # Per call not yet fetched: (tokens, valid, bindings, growth, accepted).
        self._outs: collections.deque = collections.deque()
        # Per decoding slot: a bound of its length, the call's most growth added at each
        # call and tightened to what it emitted when its tokens are fetched.
        self._bound = np.zeros(B, np.int64)
        self._limit = np.zeros(B, np.int64)  # per slot: the most it can reach
        self._order = itertools.count()

    @property
    def buckets(self) -> tuple[int, ...]:
        """The token counts a prompt chunk's step is padded to (what GetModelInfo reports)."""
        return self.token_buckets

    def prefill(self, tokens: list[int]) -> Prefix:
        n = len(tokens)
        if not 0 < n <= self.max_seq_len:
            raise ValueError(f'a prompt of {n} tokens: need 1 to max_seq_len={self.max_seq_len}')
        seq = next(self._seq_ids)
        cached = self.manager.begin(seq, tokens, budget=1)  # chunks take pages as they run
        if cached is None:
            raise OutOfPages(self._short(1, f'a prompt of {n} tokens'))
        return Prefix(seq_id=seq, prompt=tuple(tokens), cached_tokens=cached)

    def insert(self, prefix: Prefix, slot: int, settings: SlotSettings) -> StepOutput:
        try:
            if self._in_use[slot]:
                raise ValueError(f'slot {slot} is in use; free it first')
            if prefix.length + settings.max_new > self.capacity:
                # A caller bug (requests are checked first): past its pages a sequence
                # would attend the scratch page.
                raise ValueError(f'a prompt of {prefix.length} tokens and max_new='
                                 f'{settings.max_new} exceed the {self.capacity} tokens a '
                                 f'sequence can hold')
            if len(settings.stop_ids) > MAX_STOP_IDS:
                raise ValueError(f'at most {MAX_STOP_IDS} stop ids, '
                                 f'got {len(settings.stop_ids)}')
            stop = np.full((MAX_STOP_IDS,), -1, np.int32)
            stop[:len(settings.stop_ids)] = settings.stop_ids
            padded = np.zeros((1, self.max_seq_len), np.int32)  # one shape for _bind
            padded[0, :prefix.length] = prefix.prompt
            host = (padded, np.int32(prefix.length), np.int32(slot),
                    settings.sampling(), np.int32(settings.max_new), stop)
            with jax.set_mesh(self.layout.mesh):
                self.state = _bind(self.vocab_size, self.state, *self.layout.put(host))
        except Exception:
            self.manager.finish(prefix.seq_id)  # the sequence never got a slot
            raise
        self._in_use[slot] = True
        self._slot_seq[slot] = prefix.seq_id
        self._admitted[slot] = next(self._order)
        self._prompt[slot] = list(prefix.prompt)
        self._filling[slot] = _Filling(list(prefix.prompt), prefix.cached_tokens, first=True)
        self._cached[slot] = prefix.cached_tokens
        self._history[slot] = []
        self._binding[slot] += 1
        self._bound[slot] = 0
        # A done row rewrites its last position: it never needs more than prompt + max_new.
        self._limit[slot] = min(prefix.length + settings.max_new,
                                self.max_pages_per_seq * self.page_size)
        return self._no_tokens(1)

    def generate(self, masks: Callable[[], np.ndarray] | None = None) -> StepOutput:
        """masks: called once, after the call's forward is dispatched, for each slot's
        constrained-decoding bitmask of its next token, [max_batch, ceil(V / 32)] int32
        (glmjax.token_mask); with it, the call is one mixed step in two device calls,
        forward then sampling, so the host fills the masks while the forward runs."""
        self._fetch(keep=2)  # older calls are long done: their tokens cost only a copy
        if not any(self._in_use) and not self.embedding_work:
            if masks is not None:
                masks()  # the contract: always called, so the caller's tokens are fetched
            return self._no_tokens(self.max_batch)
        decoding, chunks, embeds, mixed = self._plan(one_step=masks is not None)
        before = self._bound.copy()
        if mixed:
            out, accepted = self._mixed(decoding, chunks, embeds, masks), None
        else:
            out, accepted = self._decode(decoding, _smallest(self.row_buckets, len(decoding)))
        growth = np.zeros_like(before)
        growth[decoding] = self._bound[decoding] - before[decoding]
        self._outs.append((out.tokens, out.valid, tuple(self._binding), growth, accepted))
        return out

    # ---- planning a call: pages, preemption, prompt chunks ----

    def _by_age(self) -> list[int]:
        return sorted((s for s in range(self.max_batch) if self._in_use[s]),
                      key=lambda s: self._admitted[s])

    def _plan(self, one_step: bool) -> tuple[list[int], list[tuple[int, int, int]],
                                             list[tuple[int, int, int, int]], bool]:
        """The next call's decode slots, prompt chunks (slot, start, stop), embedding chunks
        (call, input, start, stop) and whether it is a mixed step (one token per decode slot,
        while some prompt or embedding input is unfinished), their pages reserved. Chunks go
        to the oldest first, prompts and embedding calls alike. While the pool is short, the
        newest sequence is preempted."""
        while True:
            by_age = self._by_age()
            decoding = [s for s in by_age if self._filling[s] is None]
            mixed = one_step or len(decoding) < len(by_age) or self.embedding_work
            steps = 1 if mixed else self._call_tokens(len(decoding))
            short = next((s for s in decoding if not self.manager.reserve(
                self._slot_seq[s], int(min(self._bound[s] + steps, self._limit[s])))), None)
            if short is None:
                chunks, embeds = self._all_chunks(
                    [s for s in by_age if self._filling[s] is not None], len(decoding))
                if decoding or chunks or embeds:
                    return decoding, chunks, embeds, mixed
            holding = [s for s in by_age if self._slot_seq[s] is not None]
            if not holding or holding == by_age[:1] and short is None:
                # Nothing else to take pages from: cannot happen within `capacity`.
                raise OutOfPages(self._short(1, f'slot {by_age[0]} alone'))
            self._preempt(holding[-1])

    def _all_chunks(self, filling: list[int], decoding: int
                    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int, int]]]:
        """The prompt and embedding chunks of a step beside `decoding` decode rows: the
        oldest of the two kinds first (prompts by admission, embedding calls by arrival)."""
        rows = self.mixed_rows - decoding
        budget = self.max_num_batched_tokens - decoding
        context = self.context_tokens if decoding else None

        def cost(chunks: list[tuple]) -> int:
            return sum(chunk_cost(c[-2], c[-1], context) for c in chunks)

        oldest = next((e.order for e in self._embeddings.values() if not e.computed), None)
        if oldest is not None and (not filling or oldest < self._admitted[filling[0]]):
            embeds = self._embed_chunks(rows, budget, context)
            return self._chunks(filling, rows - len(embeds), budget - cost(embeds),
                                context), embeds
        chunks = self._chunks(filling, rows, budget, context)
        return chunks, self._embed_chunks(rows - len(chunks), budget - cost(chunks), context)

    def _chunks(self, filling: list[int], rows: int, budget: int, context: float | None
                ) -> list[tuple[int, int, int]]:
        """Prompt chunks for the filling slots, oldest first, within `rows`, `budget` tokens
        and the free pages; a slot that gets no pages waits (with every
        slot after it), and so does one whose next page an older slot has yet to compute
        (`PageManager.waits_on`; it takes the page once written, `extend`). While some
        sequence decodes, a token counts its context too (context_tokens, else None): the step
        is as long as that sequence's gap between two tokens. Else only whole prompts wait on
        the step, and fewer, larger steps compute them sooner."""
        chunks, older = [], []
        for s in filling:
            f = self._filling[s]
            if budget <= 0 or len(chunks) == rows:
                break
            if self._slot_seq[s] is None:  # preempted: begin again, cached pages first
                seq = next(self._seq_ids)
                cached = self.manager.begin(seq, f.tokens, budget=min(budget, len(f.tokens)))
                if cached is None:
                    break
                self._slot_seq[s], f.done = seq, cached
            seq = self._slot_seq[s]
            # Pages an older prompt computed since this one began; and the next page is not
            # computed twice at once: while an older prompt has it to compute, this waits.
            taken = self.manager.extend(seq)
            f.done += taken
            if f.first:
                self._cached[s] += taken
            held_up = any(self.manager.waits_on(seq, o) for o in older)
            older.append(seq)
            if held_up:
                continue
            held = len(self.manager.page_table(seq)) + self.manager.pool.num_free
            stop = min(len(f.tokens), chunk_stop(f.done, budget, context), held * self.page_size)
            if stop <= f.done or not self.manager.reserve(seq, stop):
                break
            chunks.append((s, f.done, stop))
            budget -= chunk_cost(f.done, stop, context)
        return chunks

    def _embed_chunks(self, rows: int, budget: int, context: float | None, preempt: bool = False
                      ) -> list[tuple[int, int, int, int]]:
        """Embedding chunks (call, input, start, stop), oldest input first, within `rows` and
        `budget` (counted as `_chunks` counts). An input takes all its
        pages when it starts, if they are free; else it waits, with every input after it
        (`can_admit` keeps its pages from newer prompts), or with `preempt` and no input
        running, the newest sequences are preempted for it."""
        chunks = []
        for key, e in self._embeddings.items():
            for i, p in enumerate(e.inputs):
                if e.done[i] == len(p):
                    continue
                if budget <= 0 or len(chunks) == rows:
                    return chunks
                if e.pages[i] is None:
                    need = pages_for(len(p), self.page_size)
                    if need > self.manager.pool.num_free:
                        if not preempt or chunks or self._embeds_running():
                            return chunks
                        self._free_pages_for(need, len(p))
                    e.pages[i] = self.manager.pool.allocate(need)
                stop = min(len(p), chunk_stop(e.done[i], budget, context))
                chunks.append((key, i, e.done[i], stop))
                budget -= chunk_cost(e.done[i], stop, context)
        return chunks

    def _embeds_running(self) -> bool:
        return any(pages is not None for e in self._embeddings.values() for pages in e.pages)

    def _preempt(self, slot: int) -> None:
        """Releases the slot's pages; it is recomputed from its tokens when pages are free."""
        if self._slot_seq[slot] is not None:
            self.manager.preempt(self._slot_seq[slot])
            self._slot_seq[slot] = None
        if self._filling[slot] is not None:
            self._filling[slot].done = 0
            return
        self._fetch(keep=0)  # every token it generated, on the host
        # The last generated token is the next decode input: its K/V was never written.
        tokens = self._prompt[slot] + self._history[slot][:-1]
        self._filling[slot] = _Filling(tokens, 0, first=False)

    def _fetch(self, keep: int) -> None:
        """Appends the tokens of all but the last `keep` calls to their slots' histories."""
        while len(self._outs) > keep:
            tokens, valid, bindings, growth, accepted = self._outs.popleft()
            tokens, valid = np.asarray(tokens), np.asarray(valid)
            for s, binding in enumerate(bindings):
                if binding == self._binding[s] and self._in_use[s]:
                    got = tokens[s][valid[s]].tolist()
                    self._history[s] += got
                    # A decode row grew by what it emitted, not by what it might have.
                    self._bound[s] -= max(0, growth[s] - len(got))
                    if got and self._filling[s] is None and self._slot_seq[s] is not None:
                        self._commit_generated(s)
            if accepted is not None:
                self._count_accepted(np.asarray(accepted))

    def _commit_generated(self, s: int) -> None:
        """Caches the decoding slot's newly full pages, as its prompt's are: the K/V of all
        its tokens but the last (the next input) is written, and no later step writes below
        it. So a next turn that resends the answer, or the slot recomputed after a
        preemption, finds them."""
        written = len(self._prompt[s]) + len(self._history[s]) - 1
        seq = self._slot_seq[s]
        if written // self.page_size > self.manager.committed_pages(seq):
            self.manager.commit(seq, (self._prompt[s] + self._history[s])[:written])

    def _count_accepted(self, accepted: np.ndarray) -> None:
        """accepted [B, steps]: drafts each row's step accepted, -1 where it did not decode."""
        runs = accepted[accepted >= 0]
        self.spec_totals['num_drafts'] += runs.size
        self.spec_totals['num_draft_tokens'] += runs.size * self.num_drafts
        self.spec_totals['num_accepted_tokens'] += int(runs.sum())
        self.spec_accepted_per_pos += (runs[:, None] > np.arange(self.num_drafts)).sum(axis=0)
        if runs.size:
            emitted, last = 1 + runs.mean(), self.spec_emitted
            self.spec_emitted = emitted if last is None else last + SPEC_EMA * (emitted - last)

    # ---- the device calls ----

    def _speculates(self, n: int) -> bool:
        """Whether a decode call of n sequences is speculative (the same answer until the
        call is made: it reads only what calls and fetches change)."""
        if not self.num_drafts or n > self.spec_max_batch:
            return False
        cost = self.spec_cost.get(_smallest(self.row_buckets, n))
        return (cost is None or self.spec_emitted is None or self.spec_emitted >= cost
                or self._plain_run >= SPEC_PROBE_EVERY)

    def _call_tokens(self, n: int) -> int:
        """The most positions a decode call of n sequences adds to each."""
        return self.call_tokens if self._speculates(n) else self.steps_per_call

    def _decode(self, slots: list[int], rows: int) -> tuple[StepOutput, jax.Array | None]:
        padded = np.full(rows, self.max_batch, np.int32)
        padded[:len(slots)] = slots
        table = self.manager.page_table_array([self._slot_seq[s] for s in slots], rows)
        speculate = self._speculates(len(slots))
        out, accepted = self._run_decode((padded, np.array([len(slots)], np.int32), table),
                                         speculate=speculate)
        if self.num_drafts:
            self.spec_calls['speculative' if speculate else 'plain'] += 1
            self._plain_run = 0 if speculate else self._plain_run + 1
        self._bound[slots] = np.minimum(self._bound[slots] + self._call_tokens(len(slots)),
                                        self._limit[slots])
        self.last_rows = rows
        return local(out), accepted

    def _run_decode(self, host: tuple, speculate: bool) -> tuple[StepOutput, jax.Array | None]:
        with jax.set_mesh(self.layout.mesh):
            if not speculate:
                self.pages, self.mtp_pages, self.state, out = _generate(
                    self.cfg, self.decode_impl, self.steps_per_call, self.num_drafts,
                    self.params, self.pages, self.mtp_pages, self.state, *self.layout.put(host))
                return out, None
            self.pages, self.mtp_pages, self.state, out, accepted = _speculate(
                self.cfg, self.decode_impl, self.steps_per_call, self.params, self.pages,
                self.mtp_pages, self.state, *self.layout.put(host))
        return out, local(accepted)

    def _run_mixed(self, host: tuple, allowed: Callable[[], np.ndarray] | None,
                   sums: bool = False, sample: bool = True
                   ) -> tuple[StepOutput | None, jax.Array | None]:
        """host: the step's arrays, as `_mixed_sample` takes them up to `allowed`, which gives
        the rows' bitmasks [R, ceil(V / 32)] once the forward is dispatched (None: free).
        Returns the outputs (None without `sample`: no row is a slot's) and, with `sums`,
        each row's sum of its final hidden states."""
        (tokens, slots, cu_q_lens, starts, is_decode, first, follow, num_seqs,
         table) = self.layout.put(host)
        with jax.set_mesh(self.layout.mesh):
            self.pages, h, logits = _mixed_forward(
                self.cfg, self.mixed_impl, self.num_drafts, self.params, self.pages,
                self.state, tokens, slots, cu_q_lens, starts, is_decode, num_seqs, table)
            row_sums = _sum_rows(self.layout, h, cu_q_lens, num_seqs) if sums else None
            masks = self._free_masks(slots.shape[0]) if allowed is None else \
                self.layout.put(allowed())
            if not sample:
                return None, row_sums
            self.mtp_pages, self.state, out = _mixed_sample(
                self.cfg, self.mixed_impl, self.steps_per_call, self.num_drafts, self.params,
                self.mtp_pages, self.state, h, logits, tokens, slots, cu_q_lens, starts,
                is_decode, first, follow, num_seqs, table, masks)
            return out, row_sums

    def _free_masks(self, rows: int) -> jax.Array:
        """Every token allowed, for every row: on the device once."""
        if rows not in self._all_allowed:
            self._all_allowed[rows] = self.layout.put(
                np.full((rows, bitmask_words(self.vocab_size)), -1, np.int32))
        return self._all_allowed[rows]

    def _mixed(self, decoding: list[int], chunks: list[tuple[int, int, int]],
               embeds: list[tuple[int, int, int, int]],
               masks: Callable[[], np.ndarray] | None) -> StepOutput:
        n_slots, rows = len(decoding) + len(chunks), self.mixed_rows
        n_rows = n_slots + len(embeds)
        n_tokens = len(decoding) + sum(stop - start for _, start, stop in chunks) + sum(
            stop - start for _, _, start, stop in embeds)
        T = _smallest(self.token_buckets, n_tokens)
        slots = np.full(rows, self.max_batch, np.int32)
        q_lens = np.zeros(rows, np.int32)
        starts = np.zeros(rows, np.int32)
        is_decode = np.zeros(rows, bool)
        first = np.zeros(rows, bool)
        follow = np.full(rows, -1, np.int32)
        tokens = np.zeros(T, np.int32)
        slots[:len(decoding)], q_lens[:len(decoding)] = decoding, 1
        is_decode[:len(decoding)] = True
        at = len(decoding)
        for r, (s, start, stop) in enumerate(chunks, len(decoding)):
            f = self._filling[s]
            slots[r], q_lens[r], starts[r] = s, stop - start, start
            first[r] = f.first and stop == len(f.tokens)
            if stop < len(f.tokens):
                follow[r] = f.tokens[stop]
            tokens[at:at + stop - start] = f.tokens[start:stop]
            at += stop - start
        seqs = [self._slot_seq[s] for s in slots[:n_slots]]
        table = self.manager.page_table_array(seqs, rows)
        for r, (key, i, start, stop) in enumerate(embeds, n_slots):  # rows of no slot
            e = self._embeddings[key]
            q_lens[r], starts[r] = stop - start, start
            table[r, :len(e.pages[i])] = e.pages[i]
            tokens[at:at + stop - start] = e.inputs[i][start:stop]
            at += stop - start
        cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)

        def allowed() -> np.ndarray:
            rows_masks = np.full((rows, bitmask_words(self.vocab_size)), -1, np.int32)
            rows_masks[:n_slots] = masks()[slots[:n_slots]]
            return rows_masks

        out, sums = self._run_mixed((tokens, slots, cu_q_lens, starts, is_decode, first, follow,
                                     np.array([n_rows], np.int32), table),
                                    None if masks is None else allowed, sums=bool(embeds),
                                    sample=n_slots > 0)
        self._bound[decoding] = np.minimum(self._bound[decoding] + 1, self._limit[decoding])
        for s, _, stop in chunks:
            f = self._filling[s]
            # Full pages are shared from now on: their K/V is written by this call, queued
            # before any later reader's.
            self.manager.commit(self._slot_seq[s], f.tokens[:stop])
            f.done = stop
            if stop == len(f.tokens):
                self._filling[s] = None
                self._bound[s] = stop
        for r, (key, i, _, stop) in enumerate(embeds, n_slots):
            e = self._embeddings[key]
            if not e.sums or e.sums[-1][0] is not sums:
                e.sums.append((sums, []))
            e.sums[-1][1].append((r, i))
            e.done[i] = stop
            if stop == len(e.inputs[i]):
                # Its K/V is neither shared nor read again; a later step that reuses the
                # pages is queued after this one.
                self.manager.pool.release(e.pages[i][::-1])
                e.pages[i] = None
        self.last_rows, self.last_tokens = rows, T
        return self._no_tokens(self.max_batch) if out is None else local(out)

    def _no_tokens(self, batch: int) -> StepOutput:
        S = self.steps_per_call if batch == self.max_batch else 1
        top = min(TOP_LOGPROBS, self.vocab_size)
        return StepOutput(tokens=np.zeros((batch, S), np.int32), valid=np.zeros((batch, S), bool),
                          logprobs=np.zeros((batch, S), np.float32),
                          top_ids=np.zeros((batch, S, top), np.int32),
                          top_logprobs=np.zeros((batch, S, top), np.float32),
                          done=np.zeros((batch,), bool) if batch == 1 else np.ones((batch,), bool))

    def _short(self, need: int, what: str) -> str:
        return (f'the KV page pool is exhausted: {what} needs {need} pages of '
                f'{self.page_size} tokens, {self.manager.pool.num_free} of '
                f'{self.manager.pool.allocatable} are free')

    def free(self, slot: int) -> None:
        if not self._in_use[slot]:
            return
        # The caller has read all calls but the last: their tokens cost only a copy, and
        # their full pages go into the prefix cache before the sequence lets them go.
        self._fetch(keep=1)
        if self._slot_seq[slot] is not None:
            self.manager.finish(self._slot_seq[slot])
        self._in_use[slot] = False
        self._slot_seq[slot] = self._filling[slot] = None
        self._prompt[slot], self._history[slot] = [], []
        self._bound[slot] = self._limit[slot] = 0
        # The rest of the device row needs no change: a slot out of the batch is neither run
        # nor read, and insert overwrites all of it.
        with jax.set_mesh(self.layout.mesh):
            self.state = _mark_done(self.state, self.layout.put(np.int32(slot)))

    def cached_tokens(self, slot: int) -> int:
        """The slot's prompt tokens taken from the prefix cache so far: those of `prefill`'s
        Prefix, and pages that an older prompt computed while this one waited for them."""
        return self._cached[slot]

    @property
    def capacity(self) -> int:
        return min(self.max_seq_len, self.max_pages_per_seq * self.page_size,
                   (self.num_pages - 1) * self.page_size)

    def can_admit(self, prompt: list[int], max_new: int) -> bool:
        """A request starts when its prompt's pages (less its cached prefix) are free beside
        what the prompts already admitted still need, and the next embedding input to start;
        running sequences that outgrow the pool later preempt the newest."""
        need = pages_for(len(prompt), self.page_size)
        need -= self.manager.cached_prefix(prompt) // self.page_size
        for s in range(self.max_batch):
            f = self._filling[s]
            if f is not None:
                held = 0 if self._slot_seq[s] is None else len(
                    self.manager.page_table(self._slot_seq[s]))
                need += max(0, pages_for(len(f.tokens), self.page_size) - held)
        need += next((pages_for(len(p), self.page_size) for e in self._embeddings.values()
                      for p, d, pages in zip(e.inputs, e.done, e.pages)
                      if pages is None and d < len(p)), 0)
        return need <= self.manager.pool.num_free

    def metrics(self) -> dict:
        out = {**self.manager.metrics(), 'num_running_seqs': sum(self._in_use)}
        if self.num_drafts:
            out.update({f'spec_decode_{k}': v for k, v in self.spec_totals.items()})
            out['spec_decode_num_accepted_tokens_per_pos'] = self.spec_accepted_per_pos.tolist()
            out.update({f'spec_decode_num_{k}_calls': v for k, v in self.spec_calls.items()})
        return out

    # ---- embeddings ----

    def embed_begin(self, prompts: list[list[int]]) -> int:
        """Queues an embedding call; returns its id. Its inputs are computed by the next
        `generate` calls, as chunks of their mixed steps (oldest first, prompts and calls
        alike) over pages of their own, and `embed_results` hands the vectors over."""
        prompts = [list(p) for p in prompts]
        if not prompts:
            raise ValueError('an embedding call needs at least one input')
        for p in prompts:
            if not 0 < len(p) <= self.capacity:
                raise ValueError(f'an embedding input of {len(p)} tokens: need 1 to '
                                 f'{self.capacity}')
        key = next(self._embed_ids)
        self._embeddings[key] = _Embedding(prompts, [0] * len(prompts), [None] * len(prompts),
                                           order=next(self._order))
        return key

    def embed_cancel(self, key: int) -> None:
        """Drops the call (its client left): its pages are released, nothing more of it runs."""
        e = self._embeddings.pop(key, None)
        for pages in [] if e is None else e.pages:
            if pages is not None:
                self.manager.pool.release(pages[::-1])

    @property
    def embedding_work(self) -> bool:
        """Whether some embedding input still has tokens to compute."""
        return any(not e.computed for e in self._embeddings.values())

    def embed_results(self, block: bool = False) -> list[tuple[int, np.ndarray]]:
        """(id, [n, D] fp32) of each computed call whose steps the device has finished (with
        `block`, of every computed call): each input's final hidden states, mean-pooled and
        L2-normalised. Each call is handed over once."""
        done = [k for k, e in self._embeddings.items() if e.computed and (
            block or all(sums.is_ready() for sums, _ in e.sums))]
        return [(k, self._vectors(self._embeddings.pop(k))) for k in done]

    def _vectors(self, e: _Embedding) -> np.ndarray:
        totals = np.zeros((len(e.inputs), self.cfg.hidden_size), np.float64)
        for sums, rows in e.sums:
            host = np.asarray(sums.addressable_data(0))
            for r, i in rows:
                totals[i] += host[r]
        means = totals / np.array([len(p) for p in e.inputs])[:, None]
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)

    def embed(self, prompts: list[list[int]]) -> np.ndarray:
        """`embed_begin` then mixed steps of embedding chunks alone until the call is computed
        (the running sequences do not advance): [len(prompts), D]. While the pool is short of
        an input's pages, the newest sequence is preempted, as for a sequence that grows."""
        key = self.embed_begin(prompts)
        while not self._embeddings[key].computed:
            embeds = self._embed_chunks(self.mixed_rows, self.max_num_batched_tokens, None,
                                        preempt=True)
            self._mixed([], [], embeds, None)
        return self._vectors(self._embeddings.pop(key))

    def _free_pages_for(self, need: int, n: int) -> None:
        """Preempts the newest sequences until `need` pages are free."""
        while self.manager.pool.num_free < need:
            holding = [s for s in self._by_age() if self._slot_seq[s] is not None]
            if not holding:  # cannot happen within `capacity`
                raise OutOfPages(self._short(need, f'an embedding input of {n} tokens'))
            self._preempt(holding[-1])

    def warmup(self, progress=None) -> None:
        """Compiles every mixed step (token buckets) and decode call (row buckets) on empty
        batches, measures the token budget if the engine was made without one
        (`_measure_budget`) and speculation's cost per row bucket if it measures it
        (`_measure_speculation`), runs an embedding step of each token bucket, then resets;
        `progress(done, total)` after each."""
        sizes = self._budget_sizes(self.max_batch, self.max_seq_len) \
            if self.measures_budget else self.token_buckets
        total = len(token_buckets(sizes[-1])) + len(self.row_buckets)
        done = 0

        def tick():
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        # Every row is padding: the shapes are compiled and nothing is written.
        for T in self.token_buckets:
            jax.block_until_ready(self._run_mixed(self._empty_mixed(T), None))
            tick()
        none, B = np.array([0], np.int32), self.max_batch
        for before, rows in zip((0, *self.row_buckets), self.row_buckets):
            host = (np.full(rows, B, np.int32), none, self.manager.page_table_array([], rows))
            # The calls of before + 1 .. rows sequences: speculative, plain, or (a bucket
            # across speculative_max_batch, or a measured rule) both.
            kinds = [True] * self._speculates(before + 1) + [False] * (
                not self._speculates(rows) or self.measures_speculation)
            for speculate in kinds:
                jax.block_until_ready(self._run_decode(host, speculate))
            tick()
        if self.measures_speculation:
            self._measure_speculation()
        if self.measures_budget:
            self._measure_budget(sizes, tick)
            if progress is not None:
                progress(total, total)  # the sizes past the budget were not needed
        for T in self.token_buckets:  # an embedding step's row sums (`_sum_rows`)
            self.embed([[0] * min(T, self.capacity)])
        self.reset()

    def _empty_mixed(self, T: int) -> tuple:
        """A mixed step's host arrays with every row padding."""
        B, R = self.max_batch, self.mixed_rows
        return (np.zeros(T, np.int32), np.full(R, B, np.int32), np.zeros(R + 1, np.int32),
                np.zeros(R, np.int32), np.zeros(R, bool), np.zeros(R, bool),
                np.full(R, -1, np.int32), np.array([0], np.int32),
                self.manager.page_table_array([], R))

    def _chunks_host(self, rows: list[tuple], T: int) -> tuple:
        """A mixed step's host arrays of prompt chunks alone, rows (ids, start, pages): ids
        at positions start.. over those pages, none of a slot's (so the step changes no
        decode state), padded to T tokens."""
        host = list(self._empty_mixed(T))
        at = 0
        for r, (ids, start, pages) in enumerate(rows):
            host[0][at:at + len(ids)], host[3][r] = ids, start
            host[8][r, :len(pages)] = pages
            at += len(ids)
            host[2][r + 1:] = at
        host[7] = np.array([len(rows)], np.int32)
        return tuple(host)

    def _chunk_step(self, ids: np.ndarray, T: int, start: int = 0) -> Callable[[], object]:
        """A mixed step of one chunk in slot 0, ids[:T] at positions start..start + T, every
        page the scratch page 0 (what warm-up times)."""
        host = self._chunks_host([(ids[:T], start, [])], T)
        host[1][0] = 0
        return lambda: self._run_mixed(host, None)

    def _measure_budget(self, sizes: tuple[int, ...], tick: Callable[[], None]) -> None:
        """Sets max_num_batched_tokens by `choose_budget`: a decode call of every row against
        mixed steps of one T-token prompt chunk (compiled here as they are reached). The
        steps are real work on made-up tokens whose every page is the scratch page 0 (the
        state and pool are reset after), so they cost what a step of that size costs: every
        row and token computed, the tokens spread over the experts."""
        B, M = self.max_batch, self.max_pages_per_seq
        ids = np.random.default_rng(0).integers(0, self.vocab_size, (sizes[-1],), np.int32)
        self.state = self.state.replace(tokens=self.layout.put(ids[:B]))
        decode = (np.arange(B, dtype=np.int32), np.array([B], np.int32),
                  np.zeros((B, M), np.int32))

        def decode_call():
            # Every row at position 0, as at the first timing: a mixed step timed beside it
            # leaves its chunk's length in row 0.
            self.state = self.state.replace(lengths=self.layout.put(np.zeros(B, np.int32)))
            return self._run_decode(decode, self._speculates(B))

        timings = self._seconds({'decode': decode_call})

        def mixed(T: int) -> float:
            pair = self._seconds({'decode': decode_call, f'mixed {T}': self._chunk_step(ids, T)})
            timings[f'mixed {T}'] = pair[f'mixed {T}']
            timings['decode'] = min(timings['decode'], pair['decode'])
            self.budget_ratios[T] = pair[f'mixed {T}'] / pair['decode']
            tick()  # a bucket past the first size: compiled here
            return self.budget_ratios[T]

        budget = choose_budget(1.0, mixed, sizes)  # each step against a decode call beside it
        self.max_num_batched_tokens, self.token_buckets = budget, token_buckets(budget)
        self.budget_timings = timings
        self.context_tokens = self._measure_context(budget, decode_call, ids)

    def _measure_context(self, T: int, decode_call: Callable[[], object],
                         ids: np.ndarray) -> float | None:
        """The step of T tokens at the deepest context the engine holds (a chunk ending at
        max_seq_len) against the same step at context 0, each beside a decode call: the
        context c at which a chunk token's attention costs what the rest of its step's work
        does, which `chunk_cost` counts as 1 + c / context_tokens. None where the two cost
        the same, or there is no context deeper than a step."""
        deep = self.max_seq_len - T
        if deep < T:
            return None
        t = self._seconds({'decode': decode_call, 'at 0': self._chunk_step(ids, T),
                           'deep': self._chunk_step(ids, T, deep)})
        self.budget_timings[f'mixed {T} at {deep}'] = t['deep']
        at_0, at_deep = t['at 0'] / t['decode'], t['deep'] / t['decode']
        return deep * at_0 / (at_deep - at_0) if at_deep > at_0 else None

    def _measure_speculation(self) -> None:
        """Sets spec_cost: per row bucket, a speculative decode call's seconds over a plain
        one's, every row live on made-up tokens over the scratch page 0 (as
        `_measure_budget`; the state and pool are reset after)."""
        B, M = self.max_batch, self.max_pages_per_seq
        ids = np.random.default_rng(1).integers(0, self.vocab_size, (B,), np.int32)
        self.state = self.state.replace(tokens=self.layout.put(ids))
        for rows in self.row_buckets:  # a measuring engine has no speculative_max_batch
            host = (np.arange(rows, dtype=np.int32), np.array([rows], np.int32),
                    np.zeros((rows, M), np.int32))
            t = self._seconds({f'{kind} {rows}': functools.partial(self._run_decode, host, s)
                               for kind, s in (('speculative', True), ('plain', False))})
            self.spec_cost[rows] = t[f'speculative {rows}'] / t[f'plain {rows}']

    def _seconds(self, runs: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Seconds of each named run (a mixed step or a decode call): the fastest of
        BUDGET_TIMINGS timings after a first run. The runs are timed in turn, so that a slow
        phase of the machine reaches each of them alike: what warm-up uses is their ratio.
        Each the largest over processes, so that every process chooses the same."""
        for run in runs.values():
            jax.block_until_ready(run())
        best = dict.fromkeys(runs, np.inf)
        for _ in range(BUDGET_TIMINGS):
            for name, run in runs.items():
                start = time.perf_counter()
                jax.block_until_ready(run())
                best[name] = min(best[name], time.perf_counter() - start)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            slowest = np.max(multihost_utils.process_allgather(
                np.array(list(best.values()), np.float64)), axis=0)
            best = dict(zip(best, map(float, slowest)))
        return best
