"""MTP speculative decoding, the device side: the MTP layer drafts, the main model verifies,
exact rejection sampling accepts. Pure functions over R rows, for a decode step to call:
`speculative_step` (one whole step), or its parts `verify_forward`, `verify` and `propose`;
`redraft` drafts where plain decode steps wrote only the MTP layer's K/V.

Letters as in glmjax/layers.py, plus R rows, M pages per row, k drafts per row, J = k + 1
verified positions. A row at a step boundary has its main K/V at positions 0..n-1 (n = its
length), its last token x_n (sampled, K/V not yet written), the MTP pairs (h_p, x_{p+1}) for
p < n in the MTP pages (glmjax/paged_mtp.py), and k drafts d_1..d_k for x_{n+1}..x_{n+k}.
One step:

1. `verify_forward`: the main model over [x_n, d_1..d_k] at positions n..n+k, one ragged chunk
   per row: logits [R, J, V] (position j predicts output j of this step) and hidden states.
2. `verify`: position j's target distribution p_j is the one `sampling.sample` would use for
   that output index: penalties with the counts as of the step plus drafts 0..j-1, logit_bias,
   temperature, top_k/top_p/min_p. Draft j is accepted with probability min(1, p_j(d)/q_j(d))
   = p_j(d), q_j being the point mass of a top-1 draft; the first rejection is replaced by a
   draw from max(p_j - q_j, 0) normalised (p_j without d); if every draft passes, one more
   token comes from p_k. Each output token is thus distributed as p exactly, whatever the
   drafts. Greedy rows (temperature 0) accept while the draft is the argmax and emit the
   argmax where it is not, so they emit exactly the non-speculative greedy tokens. A stop id
   or the max_new budget inside the run ends the row there.
3. `propose`: the MTP layer over the pairs (h_{n+j}, e_j) of the emitted tokens e_0..e_a: it
   writes their MTP K/V at n..n+a, and its output at the last pair predicts the token after
   e_a, the next step's d_1. Each further draft applies the MTP layer again to its own output
   one position on (the chain's pairs are written past the row's length: scratch that the
   next step overwrites before reading).

Rollback copies nothing: K/V written for rejected positions lies at or past the new length,
and every step writes a position before any query reads it.

What a draft step k > 1 feeds back is the MTP layer's output after its head norm (Hugging
Face `shared_head.norm`), as SGLang does for GLM-4.x and DeepSeek MTP: its
`Glm4MoeModelNextN.forward` returns the hidden state after `shared_head.norm`, and the EAGLE
worker feeds the captured states of one draft step to the next as their `hidden_states`.
That mirrors the first step, whose input is the main model's hidden after its final norm.
(vLLM's EagleProposer feeds back the state before that norm; the MTP layer was trained at
depth 1 only, so later drafts are weaker either way.)

Random keys: output index i of a row draws from `row_keys(seed, i)`, folded with ACCEPT for
the acceptance test and with RESIDUAL for the replacement or bonus draw, so a seed
reproduces a run (for the same drafts; the tokens differ from non-speculative sampling with
that seed, while their distribution is the same). Each output index is decided in exactly
one step, so no draw is reused.
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct

from glmjax.config import GlmConfig
from glmjax.model import merge
from glmjax.paged_inference import KVPages, paged_hidden
from glmjax.paged_mtp import paged_mtp_hidden
from glmjax.sampling import (
    TOP_LOGPROBS,
    SamplingParams,
    apply_penalties,
    filter_logits,
    row_keys,
    scale,
)

ACCEPT, RESIDUAL = 1, 2  # fold_in streams of an output index's key
SCRATCH_PAGE = 0  # where a write that must land nowhere goes (as glmjax.serving.kv_pages)


@struct.dataclass
class Verified:
    """What `verify` emits per row, J = k + 1 positions: e_0..e_a, valid where emitted."""
    tokens: jax.Array  # [R, J] i32
    valid: jax.Array  # [R, J] bool: emitted (a prefix of each row)
    logprobs: jax.Array  # [R, J] f32: the target's raw log-softmax, as `sample` returns
    top_ids: jax.Array  # [R, J, TOP_LOGPROBS] i32
    top_logprobs: jax.Array  # [R, J, TOP_LOGPROBS] f32
    done: jax.Array  # [R] bool: a stop id or the budget was emitted
    accepted: jax.Array  # [R] i32: drafts that passed, the leading run (metrics), 0 inactive


@struct.dataclass
class SpecRows:
    """Per-row state between speculative steps, [R] rows; the paged engine's SlotState is
    this, [max_batch] rows."""
    tokens: jax.Array  # [R] i32: the last token x_n, whose K/V the next step writes at n
    lengths: jax.Array  # [R] i32: n, positions held in the main and the MTP pages
    drafts: jax.Array  # [R, k] i32: proposals for x_{n+1}..x_{n+k}
    done: jax.Array  # [R] bool
    generated: jax.Array  # [R] i32: tokens emitted so far (x_n is output generated - 1)
    max_new: jax.Array  # [R] i32
    stop_ids: jax.Array  # [R, S] i32, -1 unused
    counts: jax.Array  # [R, V] i32: emitted tokens (penalties)
    prompt_mask: jax.Array  # [R, V] bool
    sampling: SamplingParams


def _ragged(q_lens: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Rows of q_lens [R] tokens out of [R, width], packed back to back into R * width slots:
    cu_q_lens [R + 1] and each (row, j)'s packed index [R, width] (R * width: dropped)."""
    R = q_lens.shape[0]
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    j = jnp.arange(width, dtype=jnp.int32)[None, :]
    return cu, jnp.where(j < q_lens[:, None], cu[:-1, None] + j, R * width)


def _pack(x: jax.Array, index: jax.Array) -> jax.Array:
    """[R, W, ...] -> [R * W, ...] at `index` (zeros past the rows' total)."""
    flat = x.reshape(-1, *x.shape[2:])
    return jnp.zeros_like(flat).at[index.reshape(-1)].set(flat, mode='drop')


def _unpack(x: jax.Array, index: jax.Array) -> jax.Array:
    """[T, ...] -> [R, W, ...]; entries past a row's q_len are some other token's."""
    return x[jnp.minimum(index, x.shape[0] - 1)]


def verify_forward(cfg: GlmConfig, params: dict, pages: KVPages, tokens: jax.Array,
                   lengths: jax.Array, page_indices: jax.Array, num_seqs: jax.Array,
                   num_tokens: jax.Array | None = None, *, attn_impl: str | None = None):
    """The main model over each row's tokens [R, J] (its last token and its drafts) at
    positions lengths..lengths+J-1, writing their K/V into `pages`.

    page_indices [R, M], num_seqs [1] as in `paged_forward`; num_tokens [R]: real tokens per
    row (J when None; a prefill chunk may have fewer). A row is also cut to the positions its
    page table can hold (M * page_size): a write past it would land in its last page.
    Returns (fp32 logits [R, J, V], final hidden states [R, J, D], num_logits [R] positions
    computed per row (entries past it are garbage), pages).
    """
    R, J = tokens.shape
    capacity = page_indices.shape[1] * pages.page_size
    wanted = J if num_tokens is None else num_tokens
    q_lens = jnp.clip(jnp.minimum(wanted, capacity - lengths), 1, J).astype(jnp.int32)
    cu, index = _ragged(q_lens, J)
    positions = lengths[:, None] + jnp.arange(J, dtype=jnp.int32)[None, :]
    h, pages = paged_hidden(cfg, params, _pack(tokens, index), _pack(positions, index), pages,
                            lengths + q_lens, page_indices, cu, num_seqs, attn_impl=attn_impl,
                            tokens_per_row=J)
    hidden = _unpack(h, index)  # [R, J, D]
    return merge(cfg, params).logits(hidden), hidden, q_lens, pages


def _targets(logits: jax.Array, s: SamplingParams, counts: jax.Array,
             prompt_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sampling.sample`'s distribution for rows [B, V]: (its greedy tokens [B], the filtered
    logits [B, V] its categorical draw reads)."""
    logits = apply_penalties(logits, s, counts, prompt_mask)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    cuts = (s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0))
    return greedy, jax.lax.cond(jnp.any(cuts), filter_logits, scale, logits, s)


def _draws(seed: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per (row, position), from (seed [R], output index [R, J]): the acceptance test's
    uniform [R, J] and the replacement draw's key [R, J]."""
    R, J = index.shape
    keys = row_keys(jnp.repeat(seed, J), index.reshape(-1))
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, ACCEPT)))(keys)
    return u.reshape(R, J), jax.vmap(lambda key: jax.random.fold_in(key, RESIDUAL))(keys)


def _position_targets(logits, drafts, s, counts, prompt_mask):
    """Each position's target, [R, J] greedy and [R, J, V] filtered logits: position j's
    penalties count the drafts before j (the tokens it follows when it is reached)."""
    R, J, V = logits.shape
    seen = jnp.cumsum(jax.nn.one_hot(drafts, V, dtype=jnp.int32), axis=1)  # [R, k, V]
    before = jnp.concatenate([jnp.zeros((R, 1, V), jnp.int32), seen], axis=1)
    rep = lambda x: jnp.repeat(x, J, axis=0)  # noqa: E731  rows [R] -> positions [R * J]
    greedy, filtered = _targets(logits.reshape(R * J, V), jax.tree.map(rep, s),
                                (counts[:, None] + before).reshape(R * J, V), rep(prompt_mask))
    return greedy.reshape(R, J), filtered.reshape(R, J, V)


def _accept(greedy, filtered, drafts, s, generated, width):
    """The rejection test along each row: (tokens [R, J], the accepted run [R], emitted
    [R, J] before stops)."""
    R, J, V = filtered.shape
    k = drafts.shape[1]
    j = jnp.arange(J)[None, :]
    draft = jnp.concatenate([drafts, jnp.zeros((R, 1), drafts.dtype)], axis=1)  # [R, J]
    has_draft = (j < k) & (j < width[:, None])
    u, keys = _draws(s.seed, generated[:, None] + j)
    p_draft = jnp.exp(jnp.take_along_axis(jax.nn.log_softmax(filtered), draft[..., None],
                                          axis=-1)[..., 0])
    sampled = (s.temperature > 0)[:, None]
    passes = has_draft & jnp.where(sampled, u < p_draft, draft == greedy)
    accepted = jnp.sum(jnp.cumprod(passes.astype(jnp.int32), axis=1), axis=1)
    # The residual max(p - q, 0) of a point mass q at d is p without d; with no draft
    # (position k) it is p itself: the bonus token.
    is_draft = has_draft[..., None] & (jnp.arange(V) == draft[..., None])
    residual = jnp.where(is_draft, -jnp.inf, filtered).reshape(R * J, V)
    drawn = jax.vmap(jax.random.categorical)(keys, residual).reshape(R, J).astype(jnp.int32)
    tokens = jnp.where(j < accepted[:, None], draft, jnp.where(sampled, drawn, greedy))
    return tokens, accepted, (j <= accepted[:, None]) & (j < width[:, None])


def _until_stop(tokens, emitted, generated, max_new, stop_ids):
    """(valid [R, J]: emitted up to and with the first stop id or the budget's last token,
    ends [R, J]: where a row would end)."""
    J = tokens.shape[1]
    ends = (jnp.any(tokens[..., None] == stop_ids[:, None, :], axis=-1)
            | (generated[:, None] + jnp.arange(J)[None, :] + 1 >= max_new[:, None]))
    hits = emitted & ends
    return emitted & (jnp.cumsum(hits, axis=1) - hits == 0), ends


def verify(logits: jax.Array, drafts: jax.Array, s: SamplingParams, counts: jax.Array,
           prompt_mask: jax.Array, generated: jax.Array, max_new: jax.Array,
           stop_ids: jax.Array, active: jax.Array, num_logits: jax.Array | None = None
           ) -> tuple[Verified, jax.Array, jax.Array]:
    """Exact rejection sampling of k top-1 drafts per row (see the module docstring).

    logits: fp32 [R, J, V], the target's at the J = k + 1 verified positions (position j
    predicts output index generated + j); drafts [R, k]; s: each row's settings; counts [R, V]
    emitted tokens as of position 0; prompt_mask [R, V]; generated, max_new [R]; stop_ids
    [R, S] (-1 unused); active [R]: rows that decode (others emit nothing). num_logits [R]:
    positions with real logits per row (J when None); nothing past them is tested or emitted.
    Returns (Verified, counts and generated with the emitted tokens).
    """
    R, J, V = logits.shape
    if J != drafts.shape[1] + 1:
        raise ValueError(f'{drafts.shape[1]} drafts need logits at {drafts.shape[1] + 1} '
                         f'positions, got {J}')
    width = jnp.full((R,), J) if num_logits is None else num_logits
    greedy, filtered = _position_targets(logits, drafts, s, counts, prompt_mask)
    tokens, accepted, emitted = _accept(greedy, filtered, drafts, s, generated, width)
    valid, ends = _until_stop(tokens, emitted, generated, max_new, stop_ids)
    valid &= active[:, None]
    counts = counts.at[jnp.arange(R)[:, None], tokens].add(valid.astype(counts.dtype))
    raw = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(raw, min(TOP_LOGPROBS, V))
    out = Verified(tokens=tokens, valid=valid,
                   logprobs=jnp.take_along_axis(raw, tokens[..., None], axis=-1)[..., 0],
                   top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs,
                   done=active & jnp.any(valid & ends, axis=1),
                   accepted=jnp.where(active, accepted, 0).astype(jnp.int32))
    return out, counts, generated + valid.sum(axis=1).astype(generated.dtype)


def propose(cfg: GlmConfig, params: dict, pages: KVPages, hidden: jax.Array,
            next_tokens: jax.Array, num: jax.Array, start: jax.Array, page_indices: jax.Array,
            num_seqs: jax.Array, num_drafts: int, *,
            attn_impl: str | None = None) -> tuple[jax.Array, KVPages]:
    """Writes each row's MTP pairs and drafts `num_drafts` (static, >= 1) top-1 tokens.

    hidden [R, W, D]: main final hidden states at positions start..start+W-1; next_tokens
    [R, W]: the token after each; num [R] >= 1: the real pairs per row. The pairs go into the
    MTP `pages` at their positions; the output at each row's last pair (position
    start + num - 1) predicts the first draft, and each further draft feeds the MTP output
    (after its head norm) back in with the draft before it, one position on.
    Used after verification (the emitted tokens) and to start a row (its prompt, or only its
    last position, with the first sampled token). Returns (drafts [R, num_drafts], pages).
    """
    W = next_tokens.shape[1]
    capacity = page_indices.shape[1] * pages.page_size
    q_lens = jnp.clip(jnp.minimum(num, capacity - start), 1, W).astype(jnp.int32)
    cu, index = _ragged(q_lens, W)
    positions = start[:, None] + jnp.arange(W, dtype=jnp.int32)[None, :]
    out, pages = paged_mtp_hidden(cfg, params, _pack(hidden, index), _pack(next_tokens, index),
                                  _pack(positions, index), pages, start + q_lens, page_indices,
                                  cu, num_seqs, attn_impl=attn_impl, tokens_per_row=W)
    return draft(cfg, params, pages, out[cu[1:] - 1], start + q_lens - 1, page_indices,
                 num_seqs, num_drafts, attn_impl=attn_impl)


def redraft(cfg: GlmConfig, params: dict, pages: KVPages, hidden: jax.Array, tokens: jax.Array,
            lengths: jax.Array, stale: jax.Array, page_indices: jax.Array, num_seqs: jax.Array,
            num_drafts: int, *, attn_impl: str | None = None) -> tuple[jax.Array, KVPages]:
    """Drafts [R, num_drafts] for rows whose last pair has K/V in the MTP pages but no draft
    made from it (stale [R]): the MTP layer over that pair, (hidden [R, D], the token after
    it, tokens [R]) at position lengths - 1, then `draft`. Other rows write no pair; their
    entries are garbage. Returns (drafts, pages)."""
    cu, index = _ragged(stale.astype(jnp.int32), 1)
    position = lengths - 1
    out, pages = paged_mtp_hidden(cfg, params, _pack(hidden[:, None], index),
                                  _pack(tokens[:, None], index), _pack(position[:, None], index),
                                  pages, lengths, page_indices, cu, num_seqs, attn_impl=attn_impl)
    return draft(cfg, params, pages, _unpack(out, index)[:, 0], position, page_indices, num_seqs,
                 num_drafts, attn_impl=attn_impl)


def draft(cfg: GlmConfig, params: dict, pages: KVPages, last: jax.Array, position: jax.Array,
          page_indices: jax.Array, num_seqs: jax.Array, num_drafts: int, *,
          attn_impl: str | None = None) -> tuple[jax.Array, KVPages]:
    """`num_drafts` top-1 drafts [R, num_drafts] from the MTP output `last` [R, D] at each
    row's last pair (at `position` [R]): the first is its argmax; each further one feeds the
    MTP output back in with the draft before it, one position on (writing MTP K/V past the
    row's length, which the next step overwrites)."""
    first = jnp.argmax(merge(cfg, params).logits(last), axis=-1).astype(jnp.int32)
    if num_drafts == 1:
        return first[:, None], pages
    rest, pages = _chain(cfg, params, pages, last, first, position, page_indices, num_seqs,
                         num_drafts - 1, attn_impl)
    return jnp.concatenate([first[:, None], rest], axis=1), pages


def _chain(cfg, params, pages, g, token, position, page_indices, num_seqs, steps, attn_impl):
    """`steps` more drafts [R, steps]: the MTP layer over (its own output g [R, D], the draft
    before) one position on from `position` [R], one token per row."""
    R = token.shape[0]
    capacity = page_indices.shape[1] * pages.page_size
    one_each = jnp.arange(R + 1, dtype=jnp.int32)

    def step(carry, _):
        g, token, position, pages = carry
        position = position + 1
        # A row past its page table writes into, and reads, the scratch page only: its
        # drafts there predict tokens past its capacity, which nothing emits.
        over = position >= capacity
        safe = jnp.where(over, capacity - 1, position)
        table = jnp.where(over[:, None], SCRATCH_PAGE, page_indices)
        g, pages = paged_mtp_hidden(cfg, params, g, token, safe, pages, safe + 1, table,
                                    one_each, num_seqs, attn_impl=attn_impl)
        token = jnp.argmax(merge(cfg, params).logits(g), axis=-1).astype(jnp.int32)
        return (g, token, position, pages), token

    (*_, pages), drafts = jax.lax.scan(step, (g, token, position, pages), None, length=steps)
    return drafts.T, pages


@functools.partial(jax.jit, static_argnums=0, static_argnames='attn_impl',
                   donate_argnames=('pages', 'mtp_pages'))
def speculative_step(cfg: GlmConfig, params: dict, pages: KVPages, mtp_pages: KVPages,
                     rows: SpecRows, page_indices: jax.Array, num_seqs: jax.Array, *,
                     attn_impl: str | None = None
                     ) -> tuple[KVPages, KVPages, SpecRows, Verified]:
    """One speculative decode step of R packed rows: verify each row's drafts, emit 1..k+1
    tokens, draft the next k. page_indices [R, M] and num_seqs [1] as in `paged_forward`
    (rows past num_seqs, and done rows, emit nothing). Each row needs real pages up to
    min(length + k + 1, prompt + max_new): a position past its pages goes to the scratch
    page, which other rows write too, so only positions nothing will emit may land there
    (the MTP chain writes up to k - 1 further; pages there only help its drafts).
    Returns the pages (both donated), the rows after the step and what it emitted.
    """
    R, k = rows.drafts.shape
    active = (jnp.arange(R) < num_seqs[0]) & ~rows.done
    tokens = jnp.concatenate([rows.tokens[:, None], rows.drafts], axis=1)
    logits, hidden, num_logits, pages = verify_forward(
        cfg, params, pages, tokens, rows.lengths, page_indices, num_seqs, attn_impl=attn_impl)
    out, counts, generated = verify(logits, rows.drafts, rows.sampling, rows.counts,
                                    rows.prompt_mask, rows.generated, rows.max_new,
                                    rows.stop_ids, active, num_logits)
    count = out.valid.sum(axis=1).astype(jnp.int32)
    # A row that emitted nothing writes one garbage pair past its length: it is done.
    drafts, mtp_pages = propose(cfg, params, mtp_pages, hidden, out.tokens,
                                jnp.maximum(count, 1), rows.lengths, page_indices, num_seqs, k,
                                attn_impl=attn_impl)
    last = jnp.take_along_axis(out.tokens, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    rows = rows.replace(tokens=jnp.where(count > 0, last, rows.tokens),
                        lengths=rows.lengths + count, drafts=drafts, done=rows.done | out.done,
                        counts=counts, generated=generated)
    return pages, mtp_pages, rows, out
