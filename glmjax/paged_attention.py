"""Attention over a paged KV cache, for a ragged batch of decode rows and prefill chunks.

Dimension letters as in glmjax/layers.py, plus: P pages in the pool, L positions per page
(the page size), M pages per sequence (the page table's width), R sequences (rows), Bk keys per
block of the online softmax.

The layout, per layer:
- `k_pages`, `v_pages`: [K, P, L, H] each, kv heads first (logical axes `PAGES_AXES`), so that
  on a mesh the pool shards over kv heads as the contiguous cache does, and each head's
  pages are contiguous. It is also the layout of JAX's `paged_attention` decode kernels.
- per sequence a row of the page table, `page_indices[r]`: [M] int32; position p of row r
  lives at page `page_indices[r, p // L]`, slot `p % L`.
- `kv_lens[r]`: the row's cached length *including* this step's new tokens.

The batch is ragged, with the argument conventions of JAX's TPU kernel
`jax.experimental.pallas.ops.tpu.ragged_paged_attention`: queries packed [T, N, H]; row r
owns tokens `cu_q_lens[r]:cu_q_lens[r + 1]`, which are the last q_len of its kv_lens[r]
positions; `num_seqs` ([1] int32) rows are live. Every shape is static (T, R, M padded);
only the first num_seqs + 1 entries of cu_q_lens and num_seqs of kv_lens and page_indices
are read, and tokens past cu_q_lens[num_seqs] are padding: they are written nowhere and
attend to nothing (output 0).

Implementations of `ragged_paged_attention`, all computing the same function:
- `reference`: pure JAX, runs everywhere, the one the others are checked against. Each
  token reads only its own row's pages, one block of pages at a time, with an online softmax
  (running max and sum) in fp32. A prefill chunk goes in tiles of Tq of its tokens that share
  each block of keys (a matrix product, the keys read once per tile); rows of a few tokens
  (decodes, verification) go in items of a row's next `tokens_per_row` tokens, longest
  first in tiles of 1, 1, 2, 4, ... items, each item gathering its own row's block once.
  Tiles run one after another, so temporaries are O(Tq x Bk), never [T, S].
- `tpu_ragged`: the TPU Pallas kernel `ragged_paged_attention` (mixed prefill and decode).
  It wants K and V interleaved in one pool [P, L, 2K, H]; `combine_kv_pages` makes that
  layout here, a copy of the whole pool per call (an engine on TPU should keep the pool in
  that layout instead). JAX 0.10.2 cannot interpret it on CPU (see `_tpu_ragged`).
- `tpu_paged`, `gpu_paged`: the decode kernels `tpu.paged_attention` and
  `gpu.paged_attention` (Triton). They take one query per row; every token is given to them
  as its own row (its sequence's page row, length = its position + 1), which is exact for
  any ragged batch and efficient for decode steps. Both run in interpret mode on CPU. The
  TPU one casts the K and V it loads to bf16, whatever the pool's dtype (it is made for
  bf16 caches): with an fp32 pool it is as exact as bf16 K/V.
On a mesh (`jax.set_mesh`) each kernel runs per device, over the kv heads the device holds
(`_over_heads`): the compiler partitions the reference, but not a Pallas call.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

# PAGES_AXES: the logical axes of each layer's k_pages and v_pages, mapped to the mesh like
# the parameters (glmjax.sharding.pages_shardings).
from glmjax.cache import PAGES_AXES  # noqa: F401
from glmjax.config import GlmConfig

IMPLS = ('reference', 'tpu_ragged', 'tpu_paged', 'gpu_paged')

# The reference's blocks: keys per block of its online softmax (rounded to whole pages), and
# tokens per tile (the tiles run one after another).
BLOCK_KEYS = 128
QUERY_TILE = 64


def pages_shape(cfg: GlmConfig, num_pages: int, page_size: int,
                dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
    """One layer's k_pages (or v_pages): [K, P, L, H]."""
    return jax.ShapeDtypeStruct((cfg.num_key_value_heads, num_pages, page_size, cfg.head_dim),
                                dtype)


def token_positions(kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array,
                    num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each packed token belongs: (row [T], position [T], valid [T]), int32/bool.

    A token of row r at offset j in its chunk has position kv_lens[r] - q_len[r] + j (its new
    tokens are the last of its cache). Padding tokens get valid False, row and position 0.
    The engine's RoPE positions are these too.
    """
    R = kv_lens.shape[0]
    n = num_seqs[0]
    # Entries past num_seqs may be anything: pin them to the end so that cu is sorted.
    cu = jnp.where(jnp.arange(R + 1) <= n, cu_q_lens, cu_q_lens[n])  # [R + 1]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    valid = t < cu[n]
    row = jnp.minimum(jnp.searchsorted(cu[1:], t, side='right'), R - 1).astype(jnp.int32)
    position = kv_lens[row] - (cu[row + 1] - cu[row]) + (t - cu[row])
    return jnp.where(valid, row, 0), jnp.where(valid, position, 0), valid


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             kv_lens: jax.Array, page_indices: jax.Array, cu_q_lens: jax.Array,
             num_seqs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatters the new keys and values k, v: [T, K, H] into k_pages, v_pages: [K, P, L, H]
    at each token's (page, slot). Padding tokens are dropped: they write no page at all, so
    no page needs to be reserved for them. Returns the updated pools (donate them)."""
    K, P, L, H = k_pages.shape
    row, position, valid = token_positions(kv_lens, cu_q_lens, num_seqs, k.shape[0])
    page = jnp.where(valid, page_indices[row, position // L], P)  # P: out of range, dropped
    slot = position % L
    k_pages = k_pages.at[:, page, slot].set(k.transpose(1, 0, 2).astype(k_pages.dtype),
                                            mode='drop')
    v_pages = v_pages.at[:, page, slot].set(v.transpose(1, 0, 2).astype(v_pages.dtype),
                                            mode='drop')
    return k_pages, v_pages


def choose_impl(num_tokens: int, num_seqs: int, backend: str | None = None) -> str:
    """The implementation for a step of `num_tokens` tokens over `num_seqs` rows (static).

    TPU: the ragged kernel, for every step. GPU: the Triton decode kernel for decode-shaped
    steps (no more tokens than rows); prefill there falls back to the reference until a flash
    prefill kernel is wired. CPU: the reference.
    """
    backend = backend or jax.default_backend()
    if backend == 'tpu':
        return 'tpu_ragged'
    if backend == 'gpu' and num_tokens <= num_seqs:
        return 'gpu_paged'
    return 'reference'


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           kv_lens: jax.Array, page_indices: jax.Array, cu_q_lens: jax.Array,
                           num_seqs: jax.Array, *, sm_scale: float, impl: str | None = None,
                           pages_per_block: int | None = None,
                           queries_per_block: int | None = None, tokens_per_row: int = 1,
                           interpret: bool = False, heads_axis: str | None = None) -> jax.Array:
    """Causal GQA of a ragged batch over its rows' pages.

    q: [T, N, H]; k_pages, v_pages: [K, P, L, H]; kv_lens: [R] int32; page_indices: [R, M]
    int32; cu_q_lens: [R + 1] int32; num_seqs: [1] int32. Query head n reads kv head
    n // (N // K), as in layers.attend. Returns [T, N, H] in q's dtype, 0 for padding tokens.

    `impl` (static) is one of IMPLS, `choose_impl` when None. `pages_per_block`: pages per
    key block (the reference's online-softmax block, the kernels' compute block);
    `queries_per_block`: tokens per tile of the reference, the TPU ragged kernel's query
    block. `tokens_per_row`: the reference's item width for rows of a few tokens, the
    tokens such a row is expected to have (a verification step's k + 1; 1: per token); any
    value is exact, rows of other lengths take more or padded items. `interpret` runs a
    kernel in Pallas interpret mode (on CPU, for tests). `heads_axis`: the mesh axis the
    pools' kv heads are split over (None: not split); a kernel runs per device over it (the
    reference is partitioned by the compiler).
    """
    impl = impl or choose_impl(q.shape[0], kv_lens.shape[0])
    if pages_per_block is None:
        pages_per_block = max(1, BLOCK_KEYS // k_pages.shape[2])
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if impl == 'reference':
        return _reference(*args, sm_scale=sm_scale, pages_per_block=pages_per_block,
                          queries_per_block=queries_per_block or QUERY_TILE,
                          tokens_per_row=tokens_per_row)
    if impl == 'tpu_ragged':
        return _over_heads(functools.partial(
            _tpu_ragged, sm_scale=sm_scale, pages_per_block=pages_per_block,
            queries_per_block=queries_per_block, interpret=interpret), heads_axis, *args)
    if impl in ('tpu_paged', 'gpu_paged'):
        return _over_heads(functools.partial(
            _per_token_decode, impl, sm_scale=sm_scale, pages_per_block=pages_per_block,
            interpret=interpret), heads_axis, *args)
    raise ValueError(f'unknown paged attention impl {impl!r}; choose one of {IMPLS}')


def _over_heads(kernel, heads_axis, q, k_pages, v_pages, *batch) -> jax.Array:
    """A kernel on the mesh set with `jax.set_mesh`: the compiler cannot partition a Pallas
    call, so each device runs it on its own kv heads (the pool's layout: kv heads over
    `heads_axis`, as the rules put them) and their query heads, with the batch's tables
    replicated; the heads of a group stay on one device (query head n reads kv head
    n // (N // K) locally too). Where the kv heads are not split, every device computes all
    heads. Without a mesh, the kernel as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k_pages, v_pages, *batch)
    n = mesh.shape.get(heads_axis, 1) if heads_axis else 1
    axis = heads_axis if n > 1 and k_pages.shape[0] % n == 0 else None
    heads, pages = P(None, axis, None), P(axis, None, None, None)
    # Unchecked varying axes: the kernels' outputs vary over the heads' axis by construction.
    return jax.shard_map(kernel, in_specs=(heads, pages, pages) + (P(),) * len(batch),
                         out_specs=heads, check_vma=False)(q, k_pages, v_pages, *batch)


def _pad_pages(page_indices: jax.Array, multiple: int) -> jax.Array:
    """The page table widened to a multiple of `multiple` pages with page 0: past each row's
    kv_len, so never attended to."""
    M = page_indices.shape[1]
    return jnp.pad(page_indices, ((0, 0), (0, -M % multiple)))


def _reference(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
               sm_scale: float, pages_per_block: int, queries_per_block: int,
               tokens_per_row: int) -> jax.Array:
    """Rows of a few tokens (decodes, speculative verification) go in items of W =
    tokens_per_row consecutive tokens of a row, each item gathering its row's keys once for
    its W queries (W = 1: per token). Longer rows (prefill chunks) go per row, in tiles of
    Tq of its tokens that share each block of its keys: a chunk reads its keys once per
    tile, not once per token, and a tile's scores are a matrix product. Only the live tiles
    run, so the cost follows the batch."""
    T, N, H = q.shape
    R, P = kv_lens.shape[0], k_pages.shape[1]
    Tq = min(queries_per_block, T)
    # A row's tile of Tq queries computes Tq / q_len times its work; per token it costs a
    # gather per token. On CPU, tiles of 64: rows of 2 tokens ran 6x slower per row, rows
    # of 4 about even; so rows of up to Tq / 8 go in items.
    few = max(1, Tq // 8)
    # Entries past a row's pages may be anything: clamped, they read some page, masked out.
    table = jnp.clip(_pad_pages(page_indices, pages_per_block), 0, P - 1)  # [R, M']
    tile = functools.partial(_attend_tile, k_pages, v_pages, table, sm_scale=sm_scale,
                             pages_per_block=pages_per_block)
    if T <= R:  # a decode step's shape: per token is exact for any batch, and no loop to set up
        row, position, valid = token_positions(kv_lens, cu_q_lens, num_seqs, T)
        return _per_item(tile, q[:, None], row, position[:, None], valid[:, None], Tq)[:, 0]

    n = num_seqs[0]
    cu = jnp.where(jnp.arange(R + 1) <= n, cu_q_lens, cu_q_lens[n])  # sorted, as token_positions
    q_len = cu[1:] - cu[:-1]  # [R], 0 past the live rows
    padded = jnp.pad(q, ((0, Tq), (0, 0), (0, 0)))  # a tile read from any start fits

    def spans(rows: jax.Array, width: int):
        """The spans of `width` consecutive tokens of the rows where `rows`, numbered in row
        order: (how many there are, span i -> (its row, its first token's index))."""
        per_row = jnp.where(rows, (q_len + width - 1) // width, 0)
        first = jnp.concatenate([jnp.zeros(1, per_row.dtype), jnp.cumsum(per_row)])

        def at(i):
            row = jnp.minimum(jnp.searchsorted(first[1:], i, side='right'), R - 1)
            row = row.astype(jnp.int32)
            return row, cu[row] + (i - first[row]) * width
        return first[R], at

    # Longer rows: tiles of Tq tokens, row by row, in a loop over the live ones.
    long_rows = q_len > few
    num_tiles, tile_at = spans(long_rows, Tq)

    def row_tile(i, out):
        row, start = tile_at(i)
        valid = jnp.arange(Tq) < cu[row + 1] - start
        position = kv_lens[row] - cu[row + 1] + start + jnp.arange(Tq)
        o = tile(jax.lax.dynamic_slice_in_dim(padded, start, Tq)[None], row[None],
                 position[None], valid[None])[0]
        kept = jax.lax.dynamic_slice_in_dim(out, start, Tq)
        return jax.lax.dynamic_update_slice_in_dim(
            out, jnp.where(valid[:, None, None], o, kept), start, 0)

    # The loop's buffer starts as zeros tied to this call's queries: a constant one would be
    # made (and copied for each loop) at the program's start, one per layer, all live at
    # once (XLA:CPU did: about one [T, N, H] buffer more per layer).
    zeros = padded * 0  # XLA keeps x * 0 (x may be NaN): computed here, from this q
    out = jax.lax.fori_loop(0, num_tiles, row_tile, zeros)[:T]

    # Short rows in items of W of their tokens (the rest point past the end: dropped).
    W = max(1, min(tokens_per_row, few))
    # At most ceil(few / W) items per row, and sum(ceil(q_len / W)) <= (T + R (W - 1)) / W.
    count = min(R * -(-few // W), (T + R * (W - 1)) // W)
    num_items, item_at = spans(~long_rows, W)
    i = jnp.arange(count)
    row, start = item_at(i)
    token = start[:, None] + jnp.arange(W)  # [count, W]
    real = (i < num_items)[:, None] & (token < cu[row + 1][:, None])
    position = kv_lens[row][:, None] - cu[row + 1][:, None] + token
    o = _per_item(tile, jnp.take(q, token, axis=0, mode='fill', fill_value=0), row,
                  position, real, Tq)
    return out.at[jnp.where(real, token, T)].set(o, mode='drop')


def _per_item(tile, q, row, position, valid, Tq: int) -> jax.Array:
    """Items [S] of W tokens each over their own row's keys: q [S, W, N, H] -> [S, W, N, H]
    (row [S], position and valid [S, W]). A tile reads as many blocks as its longest item
    needs, for all of its items, so they go longest first in tiles of 1, 1, 2, 4, ... then
    Tq / W items: a long sequence among short ones is read for itself alone, and a batch of
    equal lengths still takes few tiles (a tile of padding skips every block)."""
    S, W = q.shape[:2]
    if S == 1:  # one sequence decoding: nothing to order
        return tile(q, row, position, valid)
    Td = min(max(1, Tq // W), S)
    need = jnp.max(jnp.where(valid, position + 1, 0), axis=1)
    order = jnp.argsort(-need)  # longest first, padding last
    xs = [x[order] for x in (q, row, position, valid)]
    outs, at = [], 0
    for size in itertools.chain([1], (1 << i for i in itertools.count())):
        if at >= S or size >= Td:
            break
        size = min(size, S - at)
        outs.append(tile(*(x[at:at + size] for x in xs)))
        at += size
    if at < S:  # the rest in tiles of Td, one after another
        rest = [jnp.pad(x[at:], [(0, -(S - at) % Td)] + [(0, 0)] * (x.ndim - 1)).reshape(
            -1, Td, *x.shape[1:]) for x in xs]
        outs.append(jax.lax.map(lambda args: tile(*args), rest).reshape(-1, *q.shape[1:]))
    out = jnp.concatenate(outs)[:S]
    return jnp.zeros_like(q).at[order].set(out)


def _attend_tile(k_pages, v_pages, table, q, rows, position, valid, *, sm_scale: float,
                 pages_per_block: int) -> jax.Array:
    """One tile of I items of W tokens, q [I, W, N, H], rows [I], position and valid [I, W],
    over their rows' keys with an online softmax (running max and sum, fp32). Each item
    gathers its row's block of keys once for its W tokens ([K, I, Bk, H]): a prefill tile
    is one item of Tq tokens, a decode tile Tq items of one."""
    I, W, N, H = q.shape
    K, _, L, _ = k_pages.shape
    G = N // K
    Bk = pages_per_block * L
    q = q.reshape(I, W, K, G, H)

    def block(j, carry):
        m, l, acc = carry  # [I, W, K, G] twice, [I, W, K, G, H] fp32
        pages = jax.lax.dynamic_slice_in_dim(table, j * pages_per_block, pages_per_block,
                                             axis=1)[rows]  # [I, pages_per_block]
        k = k_pages[:, pages].reshape(K, I, Bk, H)
        v = v_pages[:, pages].reshape(K, I, Bk, H)
        key_position = j * Bk + jnp.arange(Bk)
        visible = valid[..., None] & (key_position <= position[..., None])  # [I, W, Bk]
        # Slots past a row's length hold other data, maybe stale or NaN: zero them, so that
        # a weight of 0 times them stays 0.
        v = jnp.where(visible.any(1)[None, :, :, None], v, jnp.zeros((), v.dtype))
        s = jnp.einsum('IWKGH,KIBH->IWKGB', q, k, preferred_element_type=jnp.float32)
        s = jnp.where(visible[:, :, None, None, :], s * sm_scale, -jnp.inf)
        m_next = jnp.maximum(m, s.max(-1))
        # A token that has seen no key yet keeps max -inf: shift by 0 there, not by -inf.
        shift = jnp.where(jnp.isfinite(m_next), m_next, 0.0)
        alpha = jnp.exp(m - shift)
        p = jnp.exp(s - shift[..., None])  # [I, W, K, G, Bk]
        pv = jnp.einsum('IWKGB,KIBH->IWKGH', p, v, preferred_element_type=jnp.float32)
        return m_next, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    # Only as many blocks as this tile's longest token needs: short rows skip the rest.
    num_blocks = (jnp.max(jnp.where(valid, position + 1, 0)) + Bk - 1) // Bk
    init = (jnp.full((I, W, K, G), -jnp.inf), jnp.zeros((I, W, K, G)),
            jnp.zeros((I, W, K, G, H)))
    _, l, acc = jax.lax.fori_loop(0, num_blocks, block, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding tokens: 0 / 1
    return out.reshape(I, W, N, H).astype(q.dtype)


def combine_kv_pages(k_pages: jax.Array, v_pages: jax.Array) -> jax.Array:
    """[K, P, L, H] twice -> [P, L, 2K, H] with K and V interleaved (kv head k at 2k and
    2k + 1): the layout of the TPU ragged kernel."""
    K, P, L, H = k_pages.shape
    kv = jnp.stack([k_pages, v_pages], axis=1)  # [K, 2, P, L, H]
    return kv.transpose(2, 3, 0, 1, 4).reshape(P, L, 2 * K, H)


def _tpu_ragged(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                sm_scale: float, pages_per_block: int, queries_per_block: int | None,
                interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as tpu_kernel

    if interpret:
        # Neither of JAX 0.10.2's interpreters runs this kernel: the TPU interpreter fails
        # on the kernel's reshaped VMEM buffer ('ReshapeTransform' object has no attribute
        # 'indices'), the generic one on its masked stores. Its argument preparation is
        # tested against the kernel's own pure-JAX reference instead.
        raise NotImplementedError('tpu_ragged cannot run in Pallas interpret mode on CPU '
                                  '(JAX 0.10.2); use it on a TPU')
    M = page_indices.shape[1]
    # The kernel's tuned block sizes are looked up from the TPU version when not given.
    block_kwargs = {}
    if queries_per_block is not None:
        block_kwargs = dict(num_kv_pages_per_block=min(pages_per_block, M),
                            num_queries_per_block=queries_per_block)
    out = tpu_kernel.ragged_paged_attention(
        q, combine_kv_pages(k_pages, v_pages), kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, **block_kwargs)
    # The kernel leaves the rows of padding tokens unwritten.
    _, _, valid = token_positions(kv_lens, cu_q_lens, num_seqs, q.shape[0])
    return jnp.where(valid[:, None, None], out, jnp.zeros((), out.dtype))


def per_token_rows(kv_lens: jax.Array, page_indices: jax.Array, cu_q_lens: jax.Array,
                   num_seqs: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array,
                                                                  jax.Array]:
    """Each token as a decode row of its own: (page rows [T, M], lengths [T], valid [T]).

    A token at position p sees exactly its row's first p + 1 positions, so a decode kernel
    over these rows computes the causal ragged batch. Padding tokens get length 1 (a
    kernel may not expect an empty row); their outputs are zeroed afterwards.
    """
    row, position, valid = token_positions(kv_lens, cu_q_lens, num_seqs, num_tokens)
    lengths = jnp.where(valid, position + 1, 1).astype(jnp.int32)
    return page_indices[row], lengths, valid


def _per_token_decode(impl, q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                      *, sm_scale: float, pages_per_block: int, interpret: bool) -> jax.Array:
    T = q.shape[0]
    rows, lengths, valid = per_token_rows(kv_lens, page_indices, cu_q_lens, num_seqs, T)
    pages_per_block = min(pages_per_block, rows.shape[1])
    # Neither kernel takes a softmax scale: scale the queries (in fp32, then back).
    q = (q.astype(jnp.float32) * sm_scale).astype(q.dtype)
    if impl == 'tpu_paged':
        out = _tpu_paged(q, k_pages, v_pages, rows, lengths, pages_per_block, interpret)
    else:
        out = _gpu_paged(q, k_pages, v_pages, rows, lengths, pages_per_block, interpret)
    return jnp.where(valid[:, None, None], out, jnp.zeros((), out.dtype))


def _tpu_paged(q, k_pages, v_pages, rows, lengths, pages_per_block, interpret):
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    # The kernel wants the table width to be a multiple of its compute block.
    rows = _pad_pages(rows, pages_per_block)
    call = functools.partial(paged_attention, q, k_pages, v_pages, lengths, rows,
                             pages_per_compute_block=pages_per_block)
    if not interpret:
        return call()
    # TPU interpret mode simulates the kernel's DMAs and semaphores on CPU.
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        return call()


def _gpu_paged(q, k_pages, v_pages, rows, lengths, pages_per_block, interpret):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    # The kernel splits each table into k_splits partitions of whole compute blocks.
    k_splits = min(16, -(-rows.shape[1] // pages_per_block))
    rows = _pad_pages(rows, k_splits * pages_per_block)
    return paged_attention(q, k_pages, v_pages, rows, lengths, block_h=16,
                           pages_per_compute_block=pages_per_block, k_splits=k_splits,
                           interpret=interpret)
