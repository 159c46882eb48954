"""Attention over pages: the pure-JAX reference against plain dense attention, the page
writes against a contiguous cache, its temporary memory, and the wired Pallas kernels against
the reference (interpret mode on CPU, or lowered for their device without one)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as tpu_ragged_kernel

from glmjax import paged_attention as pa
from glmjax.layers import attend

K, N, H, L = 2, 4, 16, 4  # kv heads, query heads, head dim, page size
SCALE = H ** -0.5

# A ragged batch: (kv_len, q_len) per live row. Decode at position 0 and at the first slot of
# a page; a prefill chunk not aligned to pages crossing a page boundary (13..17); a whole
# first prefill over two pages; a chunk crossing a boundary (10..12); a decode.
ROWS = [(1, 1), (9, 1), (18, 5), (6, 6), (13, 3), (4, 1)]
NUM_ROWS, NUM_TOKENS, MAX_PAGES, NUM_PAGES = 8, 24, 6, 32  # padded: 2 rows, 7 tokens


def cdiv(a, b):
    return -(-a // b)


def make_batch(rng, rows, garbage=np.nan, filled=None, num_tokens=NUM_TOKENS):
    """Contiguous K/V per live row ([K, kv_len, H] each) laid into pages taken in shuffled
    order, every other slot of the pool, every page-table entry past a row's pages and every
    padded entry of kv_lens / cu_q_lens set to garbage. `filled[r]` (default kv_len): how
    many of row r's positions are written (the rest stays garbage, for write tests)."""
    kv_lens = [kv for kv, _ in rows]
    q_lens = [ql for _, ql in rows]
    filled = kv_lens if filled is None else filled
    ks = [rng.standard_normal((K, kv, H)).astype(np.float32) for kv in kv_lens]
    vs = [rng.standard_normal((K, kv, H)).astype(np.float32) for kv in kv_lens]
    k_pages = np.full((K, NUM_PAGES, L, H), garbage, np.float32)
    v_pages = np.full((K, NUM_PAGES, L, H), garbage, np.float32)
    free = list(rng.permutation(NUM_PAGES))
    table = rng.integers(0, NUM_PAGES, (NUM_ROWS, MAX_PAGES)).astype(np.int32)
    for r, kv in enumerate(kv_lens):
        for i in range(cdiv(kv, L)):
            table[r, i] = free.pop()
        for p in range(filled[r]):
            k_pages[:, table[r, p // L], p % L] = ks[r][:, p]
            v_pages[:, table[r, p // L], p % L] = vs[r][:, p]
    n = len(rows)
    lens = rng.integers(0, MAX_PAGES * L, NUM_ROWS).astype(np.int32)
    lens[:n] = kv_lens
    cu = rng.integers(0, num_tokens, NUM_ROWS + 1).astype(np.int32)
    cu[:n + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    q = rng.standard_normal((num_tokens, N, H)).astype(np.float32)
    batch = dict(q=q, k_pages=k_pages, v_pages=v_pages, kv_lens=lens, page_indices=table,
                 cu_q_lens=cu, num_seqs=np.array([n], np.int32))
    return batch, ks, vs


def dense(q, ks, vs, rows):
    """Plain causal GQA per row in float64, padding tokens 0: [T, N, H]."""
    out = np.zeros(q.shape, np.float64)
    start = 0
    for r, (kv, ql) in enumerate(rows):
        qr = q[start:start + ql].reshape(ql, K, N // K, H).astype(np.float64)
        s = np.einsum('tkgh,ksh->tkgs', qr, ks[r]) * SCALE
        query_pos = kv - ql + np.arange(ql)
        s = np.where((np.arange(kv)[None] <= query_pos[:, None])[:, None, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[start:start + ql] = np.einsum('tkgs,ksh->tkgh', p, vs[r]).reshape(ql, N, H)
        start += ql
    return out


def attention(batch, impl='reference', **kwargs):
    fn = jax.jit(functools.partial(pa.ragged_paged_attention, sm_scale=SCALE, impl=impl,
                                   **kwargs))
    return fn(**{name: jnp.asarray(x) for name, x in batch.items()})


def test_token_positions():
    # Rows of q_len 1, 0 and 3 with kv_lens 5, 7, 4; the padded row's entries are garbage.
    kv_lens = jnp.array([5, 7, 4, 99], jnp.int32)
    cu_q_lens = jnp.array([0, 1, 1, 4, 2], jnp.int32)
    row, position, valid = pa.token_positions(kv_lens, cu_q_lens, jnp.array([3], jnp.int32), 6)
    assert row.tolist() == [0, 2, 2, 2, 0, 0]
    assert position.tolist() == [4, 1, 2, 3, 0, 0]
    assert valid.tolist() == [True, True, True, True, False, False]


# 4 pages do not divide MAX_PAGES; tiles of 5 tokens cut rows and leave a padded last tile;
# tiles of 2 split every chunk. With tiles of 64, rows of up to 8 tokens go per token (all of
# the first batch's), with tiles of 5 or 2 only rows of one. A live row may have no token
# this step (the second batch's (7, 0)).
@pytest.mark.parametrize('pages_per_block, queries_per_block', [(1, 64), (4, 5), (2, 2)])
@pytest.mark.parametrize('rows', [ROWS, [(5, 2), (7, 0), (24, 16), (3, 1)]])
def test_reference_equals_dense(pages_per_block, queries_per_block, rows):
    """Unowned pages, slots past each row's length and page-table entries past its pages are
    all NaN: a finite, equal result shows that each token read only its own row's keys."""
    batch, ks, vs = make_batch(np.random.default_rng(0), rows)
    out = np.asarray(attention(batch, pages_per_block=pages_per_block,
                               queries_per_block=queries_per_block))
    live = sum(ql for _, ql in rows)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:live], dense(batch['q'], ks, vs, rows)[:live], atol=1e-5)
    assert (out[live:] == 0).all()


# Items of several tokens: rows longer than an item take several (the last one padded),
# shorter rows one padded item; the third batch is a verification step's shape (equal rows).
@pytest.mark.parametrize('tokens_per_row', [2, 3, 8])
@pytest.mark.parametrize('rows', [ROWS, [(5, 2), (7, 0), (24, 16), (3, 1)],
                                  [(9, 3), (18, 3), (4, 3), (13, 3)]])
def test_reference_in_items_of_several_tokens_equals_dense(tokens_per_row, rows):
    batch, ks, vs = make_batch(np.random.default_rng(6), rows)
    out = np.asarray(attention(batch, tokens_per_row=tokens_per_row))
    live = sum(ql for _, ql in rows)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:live], dense(batch['q'], ks, vs, rows)[:live], atol=1e-5)
    assert (out[live:] == 0).all()


def test_a_step_of_no_more_tokens_than_rows_equals_dense():
    """8 tokens for 8 rows (a decode step's shape), one row a chunk of 5: all per token."""
    rows = [(9, 1), (18, 5), (4, 1)]
    batch, ks, vs = make_batch(np.random.default_rng(5), rows, num_tokens=NUM_ROWS)
    out = np.asarray(attention(batch))
    np.testing.assert_allclose(out[:7], dense(batch['q'], ks, vs, rows)[:7], atol=1e-5)
    assert (out[7:] == 0).all()


def test_no_live_rows_gives_zeros():
    batch, _, _ = make_batch(np.random.default_rng(1), ROWS)
    batch['num_seqs'] = np.array([0], np.int32)
    out = np.asarray(attention(batch))
    assert (out == 0).all()


def test_write_then_attend_equals_contiguous_cache():
    """History already in the pages, this step's keys written by write_kv: the pool changes
    exactly at the new tokens' slots (padding tokens write nothing), and attention over it
    equals layers.attend over the concatenated contiguous cache [1, K, S, H]."""
    rng = np.random.default_rng(2)
    history = [0, 8, 13, 0, 10, 3]
    batch, ks, vs = make_batch(rng, ROWS, filled=history)
    # The new tokens' keys and values in packed order; padding tokens' are random too.
    new_k = rng.standard_normal((NUM_TOKENS, K, H)).astype(np.float32)
    new_v = rng.standard_normal((NUM_TOKENS, K, H)).astype(np.float32)
    expect_k, expect_v = batch['k_pages'].copy(), batch['v_pages'].copy()
    start = 0
    for r, (kv, ql) in enumerate(ROWS):
        assert history[r] == kv - ql
        ks[r][:, history[r]:] = new_k[start:start + ql].transpose(1, 0, 2)
        vs[r][:, history[r]:] = new_v[start:start + ql].transpose(1, 0, 2)
        for j, p in enumerate(range(history[r], kv)):
            expect_k[:, batch['page_indices'][r, p // L], p % L] = new_k[start + j]
            expect_v[:, batch['page_indices'][r, p // L], p % L] = new_v[start + j]
        start += ql

    meta = {name: jnp.asarray(batch[name])
            for name in ('kv_lens', 'page_indices', 'cu_q_lens', 'num_seqs')}
    k_pages, v_pages = jax.jit(pa.write_kv, donate_argnums=(0, 1))(
        jnp.asarray(batch['k_pages']), jnp.asarray(batch['v_pages']), jnp.asarray(new_k),
        jnp.asarray(new_v), **meta)
    np.testing.assert_array_equal(np.asarray(k_pages), expect_k)
    np.testing.assert_array_equal(np.asarray(v_pages), expect_v)

    out = np.asarray(attention(dict(batch, k_pages=k_pages, v_pages=v_pages)))
    start = 0
    for r, (kv, ql) in enumerate(ROWS):
        q = jnp.asarray(batch['q'][None, start:start + ql])  # [1, T, N, H]
        visible = jnp.arange(kv)[None, None, :] <= (kv - ql + jnp.arange(ql))[None, :, None]
        want = attend(q, jnp.asarray(ks[r][None]), jnp.asarray(vs[r][None]), visible, SCALE)
        np.testing.assert_allclose(out[start:start + ql], np.asarray(want[0]), atol=1e-5)
        start += ql


def test_reference_temp_memory_is_far_below_the_score_matrix():
    """A 512-token chunk over 32K cached tokens: dense attention's compiled temporaries hold
    the [N, T, S] fp32 scores; the reference's hold a block of them."""
    T, S, page = 512, 32768, 16
    M = S // page
    f32, i32 = jnp.float32, jnp.int32
    q = jax.ShapeDtypeStruct((T, N, H), f32)
    pages = jax.ShapeDtypeStruct((K, M + 1, page, H), f32)
    fn = jax.jit(functools.partial(pa.ragged_paged_attention, sm_scale=SCALE, impl='reference'))
    compiled = fn.lower(q, pages, pages, jax.ShapeDtypeStruct((4,), i32),
                        jax.ShapeDtypeStruct((4, M), i32), jax.ShapeDtypeStruct((5,), i32),
                        jax.ShapeDtypeStruct((1,), i32)).compile()
    paged_temp = compiled.memory_analysis().temp_size_in_bytes
    scores = T * S * 4 * N

    kv = jax.ShapeDtypeStruct((1, K, S, H), f32)
    dense_temp = jax.jit(functools.partial(attend, scale=SCALE)).lower(
        jax.ShapeDtypeStruct((1, T, N, H), f32), kv, kv,
        jax.ShapeDtypeStruct((1, T, S), bool)).compile().memory_analysis().temp_size_in_bytes
    assert dense_temp >= scores  # the measure does see a score matrix when there is one
    assert paged_temp * 50 < scores, (paged_temp, scores)


def test_bf16_inputs_are_close_to_fp32():
    batch, _, _ = make_batch(np.random.default_rng(3), ROWS, garbage=0.0)
    rounded = {name: x.astype(jnp.bfloat16) if x.dtype == np.float32 else x
               for name, x in batch.items()}
    out = attention(rounded)
    assert out.dtype == jnp.bfloat16
    want = attention({name: np.asarray(x, np.float32) if x.dtype == jnp.bfloat16 else x
                      for name, x in rounded.items()})
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), atol=2e-2)


def test_choose_impl():
    assert pa.choose_impl(24, 8) == 'reference'  # this machine's backend: cpu
    assert pa.choose_impl(512, 8, backend='cpu') == 'reference'
    assert pa.choose_impl(8, 8, backend='tpu') == 'tpu_ragged'
    assert pa.choose_impl(8, 8, backend='gpu') == 'gpu_paged'
    assert pa.choose_impl(512, 8, backend='gpu') == 'reference'
    with pytest.raises(ValueError, match='unknown paged attention impl'):
        attention(make_batch(np.random.default_rng(4), ROWS)[0], impl='flash')


@pytest.mark.parametrize('impl', ['tpu_paged', 'gpu_paged'])
def test_decode_kernel_in_interpret_mode_equals_reference(impl):
    """The decode kernels, given each token as a row of its own, on the whole ragged batch
    (prefill chunks included). Finite garbage: these kernels do not zero unread slots. K and
    V are rounded to bf16 values: the TPU kernel casts what it loads to bf16."""
    batch, _, _ = make_batch(np.random.default_rng(5), ROWS, garbage=7.0)
    for name in ('k_pages', 'v_pages'):
        batch[name] = batch[name].astype(jnp.bfloat16).astype(np.float32)
    want = np.asarray(attention(batch, pages_per_block=2))
    got = np.asarray(attention(batch, impl=impl, pages_per_block=2, interpret=True))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('impl', ['tpu_paged', 'gpu_paged'])
@pytest.mark.parametrize('axes, heads', [({'tensor': 2, 'expert': 4}, 'tensor'),
                                         ({'tensor': 4, 'expert': 2}, 'expert'),
                                         ({'tensor': 8}, 'tensor')])
def test_decode_kernel_on_a_mesh_runs_per_device_and_equals_reference(impl, axes, heads):
    """On a mesh the compiler cannot partition a Pallas call: each device runs the kernel on
    its kv heads (pages split over the axis the rules give them, tensor or expert); 2 kv
    heads do not split over tensor=8, so there every device computes all of them. All equal
    the reference on one device."""
    from glmjax import sharding
    batch, _, _ = make_batch(np.random.default_rng(6), ROWS, garbage=7.0)
    for name in ('k_pages', 'v_pages'):
        batch[name] = batch[name].astype(jnp.bfloat16).astype(np.float32)
    want = np.asarray(attention(batch, pages_per_block=2))
    mesh = sharding.make_mesh(axes)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        heads if K % axes[heads] == 0 else None))
    placed = {name: jax.device_put(x, split if name.endswith('_pages') else
                                   jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
              for name, x in batch.items()}
    fn = jax.jit(functools.partial(pa.ragged_paged_attention, sm_scale=SCALE, impl=impl,
                                   pages_per_block=2, interpret=True, heads_axis=heads))
    with jax.set_mesh(mesh):
        got = fn(**placed)
        text = fn.lower(**placed).as_text()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert 'shard_map' in text or 'manual' in text
    # Each device's query heads: split over `heads` exactly when the kv heads are.
    manual = text[text.index('manual_computation'):text.index('manual_axes')]
    split_heads = f'<@mesh, [{{}}, {{"{heads}"}}, {{}}]>'
    assert (split_heads in manual) == (K % axes[heads] == 0), manual


def test_tpu_ragged_layout_and_arguments():
    """The TPU ragged kernel cannot run in interpret mode on CPU (JAX 0.10.2): check what is
    ours instead. The interleaved pool and the arguments, given to the kernel module's own
    pure-JAX reference, give our reference's output; they pass the kernel's static checks."""
    batch, _, _ = make_batch(np.random.default_rng(6), ROWS, garbage=7.0)
    kv = np.asarray(pa.combine_kv_pages(batch['k_pages'], batch['v_pages']))
    assert kv.shape == (NUM_PAGES, L, 2 * K, H)
    np.testing.assert_array_equal(kv[:, :, 0::2], batch['k_pages'].transpose(1, 2, 0, 3))
    np.testing.assert_array_equal(kv[:, :, 1::2], batch['v_pages'].transpose(1, 2, 0, 3))

    meta = [jnp.asarray(batch[name])
            for name in ('kv_lens', 'page_indices', 'cu_q_lens', 'num_seqs')]
    theirs = tpu_ragged_kernel.ref_ragged_paged_attention(
        jnp.asarray(batch['q']), jnp.asarray(kv), *meta, sm_scale=SCALE)
    live = sum(ql for _, ql in ROWS)
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(attention(batch))[:live],
                               atol=1e-5)
    with pytest.raises(NotImplementedError, match='interpret mode'):
        attention(batch, impl='tpu_ragged', interpret=True)


# Shapes of a GLM-4.6 layer on one device (96 query heads over 8 kv heads, head dim 128), bf16.
GLM = dict(T=64, N=96, K=8, H=128, P=256, L=16, R=16, M=32)


def glm_args():
    g = GLM
    S = jax.ShapeDtypeStruct
    pages = S((g['K'], g['P'], g['L'], g['H']), jnp.bfloat16)
    return (S((g['T'], g['N'], g['H']), jnp.bfloat16), pages, pages, S((g['R'],), jnp.int32),
            S((g['R'], g['M']), jnp.int32), S((g['R'] + 1,), jnp.int32), S((1,), jnp.int32))


@pytest.mark.parametrize('impl, platform, marker', [
    ('tpu_paged', 'tpu', 'tpu_custom_call'),
    ('gpu_paged', 'cuda', 'triton'),
])
def test_decode_kernel_lowers_for_its_device(impl, platform, marker):
    """Lowered (not run) for the real device at GLM-4.6's head shapes: the kernel accepts
    our prepared arguments and emits its Mosaic / Triton call."""
    fn = jax.jit(functools.partial(pa.ragged_paged_attention, sm_scale=GLM['H'] ** -0.5,
                                   impl=impl, pages_per_block=8))
    text = fn.trace(*glm_args()).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text


def test_tpu_ragged_traces_at_glm_shapes():
    """Lowering it needs a TPU (the kernel asks the device for its generation); tracing
    builds the kernel's whole body with our layout and block sizes."""
    fn = jax.jit(functools.partial(pa.ragged_paged_attention, sm_scale=GLM['H'] ** -0.5,
                                   impl='tpu_ragged', pages_per_block=8, queries_per_block=32))
    out = fn.trace(*glm_args()).out_info
    assert out.shape == (GLM['T'], GLM['N'], GLM['H']) and out.dtype == jnp.bfloat16
