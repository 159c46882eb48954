"""The cached path equals the full forward; rows of different lengths; bf16 against fp32."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import (
    GlmConfig,
    abstract_params,
    cache_shapes,
    decode,
    forward,
    init_cache,
    init_params,
    prefill,
)

CFG = dataclasses.replace(
    GlmConfig.preset('glm-4.6'), vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    first_k_dense_replace=1, max_position_embeddings=256)


@pytest.fixture(scope='module')
def params():
    return init_params(CFG, jnp.float32, seed=1)


def sequences(B, T, seed=0):
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, (B, T)).astype(np.int32)


def test_prefill_then_decode_equals_forward_with_ragged_rows(params):
    seqs = sequences(3, 20)
    full = np.asarray(forward(CFG, params, jnp.asarray(seqs)))
    prompt_lens = np.array([4, 11, 7], np.int32)
    padded = np.where(np.arange(12)[None] < prompt_lens[:, None], seqs[:, :12], 0)
    cache = init_cache(CFG, 3, 32, jnp.float32)
    logits, cache = prefill(CFG, params, jnp.asarray(padded), jnp.asarray(prompt_lens), cache)
    np.testing.assert_allclose(np.asarray(logits), full[np.arange(3), prompt_lens - 1],
                               rtol=0, atol=1e-5)
    for step in range(8):
        pos = prompt_lens + step
        logits, cache = decode(CFG, params, jnp.asarray(seqs[np.arange(3), pos]), cache)
        np.testing.assert_allclose(np.asarray(logits), full[np.arange(3), pos],
                                   rtol=0, atol=1e-5)
    assert np.asarray(cache.lengths).tolist() == (prompt_lens + 8).tolist()


def test_chunked_prefill_equals_one_chunk(params):
    seqs = sequences(2, 16, seed=1)
    full = np.asarray(forward(CFG, params, jnp.asarray(seqs)))
    cache = init_cache(CFG, 2, 32, jnp.float32)
    _, cache = prefill(CFG, params, jnp.asarray(seqs[:, :6]), jnp.array([6, 6]), cache)
    # Second chunk: row 0 takes 10 more tokens, row 1 only 3 (the rest is padding).
    chunk = seqs[:, 6:16].copy()
    chunk[1, 3:] = 0
    logits, cache = prefill(CFG, params, jnp.asarray(chunk), jnp.array([10, 3]), cache)
    np.testing.assert_allclose(np.asarray(logits), full[[0, 1], [15, 8]], rtol=0, atol=1e-5)
    # Row 1 continues from its own length, unaffected by the padding written past it.
    logits, _ = decode(CFG, params, jnp.asarray(seqs[:, [0, 9]].diagonal()), cache)
    np.testing.assert_allclose(np.asarray(logits)[1], full[1, 9], rtol=0, atol=1e-5)


def test_zero_length_row_is_left_untouched(params):
    seqs = sequences(2, 8, seed=2)
    cache = init_cache(CFG, 2, 16, jnp.float32)
    _, cache = prefill(CFG, params, jnp.asarray(seqs), jnp.array([8, 0]), cache)
    assert np.asarray(cache.lengths).tolist() == [8, 0]
    # Row 1 is prefilled later, alone; row 0 must keep its cache.
    other = sequences(2, 8, seed=9)
    _, cache = prefill(CFG, params, jnp.asarray(other), jnp.array([0, 8]), cache)
    nxt = np.array([5, 6], np.int32)
    logits, _ = decode(CFG, params, jnp.asarray(nxt), cache)
    expected_rows = np.stack([seqs[0], other[1]])
    ref = np.asarray(forward(CFG, params, jnp.asarray(
        np.concatenate([expected_rows, nxt[:, None]], 1))))
    np.testing.assert_allclose(np.asarray(logits), ref[:, 8], rtol=0, atol=1e-5)


def test_bf16_is_close_to_fp32(params):
    seqs = jnp.asarray(sequences(2, 24, seed=3))
    ref = forward(CFG, params, seqs)
    # The router and its correction bias stay fp32 in bf16 models, as in the checkpoints.
    low = jax.tree_util.tree_map_with_path(
        lambda path, x: x if path[-1].key in ('router', 'router_bias') else
        x.astype(jnp.bfloat16), params)
    got = forward(CFG, low, seqs)
    p, q = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(got, -1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
    assert got.dtype == jnp.float32
    assert 0 < kl < 1e-3, kl


def test_bounded_cache_read_changes_nothing(params):
    seqs = sequences(2, 12, seed=4)
    full = np.asarray(forward(CFG, params, jnp.asarray(seqs)))
    cache = init_cache(CFG, 2, 64, jnp.float32)
    logits, cache = prefill(CFG, params, jnp.asarray(seqs[:, :8]), jnp.array([8, 5]), cache,
                            kv_len=16)
    np.testing.assert_allclose(np.asarray(logits), full[[0, 1], [7, 4]], rtol=0, atol=1e-5)
    logits, cache = decode(CFG, params, jnp.asarray(seqs[[0, 1], [8, 5]]), cache, kv_len=16)
    np.testing.assert_allclose(np.asarray(logits), full[[0, 1], [8, 5]], rtol=0, atol=1e-5)
    assert cache.k[0].shape[2] == 64  # the cache keeps its size; only the read is bounded


def test_decode_reads_the_cache_and_weights_in_place():
    """The compiled step copies no array as large as one layer's cache or an attention
    weight: such a copy (a layout change XLA inserts) would cross memory again each step."""
    cfg = dataclasses.replace(CFG, hidden_size=256, num_attention_heads=8, head_dim=32,
                              num_key_value_heads=4, max_position_embeddings=1024)
    B, S = 8, 512
    hlo = decode.lower(cfg, abstract_params(cfg, jnp.float32),
                       jax.ShapeDtypeStruct((B,), jnp.int32),
                       cache_shapes(cfg, B, S, jnp.float32)).compile().as_text()
    smallest = min(B * S * cfg.num_key_value_heads * cfg.head_dim,  # one layer's k
                   cfg.num_attention_heads * cfg.head_dim * cfg.hidden_size)  # attention o
    copies = [line.strip()[:120] for line in hlo.splitlines()
              if (m := re.search(r'= f32\[([\d,]+)\]\S* (copy|transpose)\(', line))
              and np.prod([int(n) for n in m.group(1).split(',')]) >= smallest]
    assert not copies, copies
