"""Module-by-module parity with transformers, so that a failure says where."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from glmjax import GlmConfig, load_hf
from glmjax.model import merge
from glmjax.moe import EXPERT_IMPLS, route


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    """A transformers model and the same weights in glmjax: grouped routing, qk-norm, biases."""
    path = tmp_path_factory.mktemp('modules')
    model = hf_tiny.make_model(seed=7, n_group=4, topk_group=2, n_routed_experts=16,
                               num_experts_per_tok=4)
    hf_tiny.save(model, path)
    cfg = GlmConfig.from_hf(path)
    return model, cfg, merge(cfg, load_hf(path, cfg, dtype=jnp.float32))


def inputs(cfg, B=2, T=7, seed=0):
    x = np.random.RandomState(seed).randn(B, T, cfg.hidden_size).astype(np.float32)
    return x, torch.from_numpy(x)


def test_attention_with_rope_and_qk_norm(pair):
    model, cfg, ours = pair
    x, xt = inputs(cfg)
    positions = np.broadcast_to(np.arange(3, 3 + x.shape[1]), x.shape[:2])  # not from 0
    pos_t = torch.from_numpy(positions.copy())
    with torch.no_grad():
        cos_sin = model.model.rotary_emb(xt, pos_t)
        ref, _ = model.model.layers[1].self_attn(xt, cos_sin, attention_mask=None)
    got, _ = ours.layers[1].attn(jnp.asarray(x), jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=0, atol=1e-5)


def test_dense_mlp(pair):
    model, cfg, ours = pair
    x, xt = inputs(cfg)
    with torch.no_grad():
        ref = model.model.layers[0].mlp(xt)
    got = ours.layers[0].mlp(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=0, atol=1e-5)


def test_router_choice_and_weights(pair):
    model, cfg, ours = pair
    x, xt = inputs(cfg, B=4, T=16)
    flat = x.reshape(-1, cfg.hidden_size)
    with torch.no_grad():
        _, ref_w, ref_ids = model.model.layers[1].mlp.gate(xt)
    moe = ours.layers[1].mlp
    w, ids = route(cfg, jnp.asarray(flat), moe.router[...], moe.router_bias[...])
    w, ids, ref_w, ref_ids = map(np.asarray, (w, ids, ref_w.numpy(), ref_ids.numpy()))
    for t in range(flat.shape[0]):
        assert sorted(ids[t]) == sorted(ref_ids[t])
        ours_by_id = dict(zip(ids[t], w[t]))
        for e, we in zip(ref_ids[t], ref_w[t]):
            assert abs(ours_by_id[e] - we) < 1e-6
    # The correction bias steers the choice: without it some tokens pick other experts.
    _, unbiased = route(cfg, jnp.asarray(flat), moe.router[...], jnp.zeros(cfg.n_routed_experts))
    assert (np.sort(np.asarray(unbiased), -1) != np.sort(ids, -1)).any()
    # Group-limited: every token's experts come from at most topk_group groups.
    per_group = cfg.n_routed_experts // cfg.n_group
    assert all(len(set(row // per_group)) <= cfg.topk_group for row in ids)


@pytest.mark.parametrize('impl', sorted(EXPERT_IMPLS))
def test_moe_block(pair, impl):
    model, cfg, ours = pair
    x, xt = inputs(cfg, B=3, T=5)
    with torch.no_grad():
        ref = model.model.layers[1].mlp(xt)
    got = ours.layers[1].mlp(jnp.asarray(x), impl=impl)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=0, atol=1e-5)


def test_final_norm(pair):
    model, cfg, ours = pair
    x, xt = inputs(cfg)
    with torch.no_grad():
        ref = model.model.norm(xt)
    np.testing.assert_allclose(np.asarray(ours.norm(jnp.asarray(x))), ref.numpy(), atol=1e-6)


@pytest.mark.parametrize('T,k,E,skew', [(7, 2, 4, False), (300, 4, 16, False),
                                         (400, 4, 16, True), (64, 8, 160, False)])
@pytest.mark.parametrize('impl', ['tiled', 'batched', 'grouped'])
def test_sorted_experts_equal_dense_for_any_routing(T, k, E, skew, impl):
    """Groups of every size, tiles that run past their group, most pairs on two experts
    (groups longer than `tiled`'s large tile; for `batched`: past its capacities, so run
    tiled), and zero-weight pairs (experts on other shards) left out."""
    from glmjax.moe import EXPERT_IMPLS, capacities, experts_dense, tile_rows
    F, D = 8, 16
    rng = np.random.RandomState(T + E)
    ids = np.stack([rng.choice(2 if skew and t % 5 else E, k, replace=False)
                    if not skew or t % 5 == 0 else np.r_[rng.choice(2, 2, replace=False),
                                                         rng.choice(np.arange(2, E), k - 2,
                                                                    replace=False)]
                    for t in range(T)]).astype(np.int32)
    weights = rng.uniform(size=(T, k)).astype(np.float32)
    weights[rng.uniform(size=(T, k)) < 0.1] = 0.0
    x = rng.normal(size=(T, D)).astype(np.float32)
    gate, up, down = (rng.normal(size=(E, F, D)).astype(np.float32) / 4 for _ in range(3))
    args = [jnp.asarray(a) for a in (x, weights, ids, gate, up, down)]
    largest = np.bincount(ids[weights > 0], minlength=E).max()
    assert (largest > capacities(T * k, E, T)[-1]) == skew
    assert (largest > tile_rows(T * k, E)[0]) == skew
    np.testing.assert_allclose(np.asarray(jax.jit(EXPERT_IMPLS[impl])(*args)),
                               np.asarray(experts_dense(*args)), rtol=1e-5, atol=1e-5)


def test_grouped_experts_compute_no_pair_of_weight_zero(monkeypatch):
    """Padding tokens and the experts of other shards route with weight 0: `grouped` gives
    its grouped matmuls only the weighted pairs (the groups add up to their count, the rest
    of the rows are in no group), and its sums equal the dense reference's."""
    from glmjax.moe import experts_dense, experts_grouped
    T, k, E, F, D = 40, 4, 8, 8, 16
    rng = np.random.RandomState(0)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    weights = rng.uniform(size=(T, k)).astype(np.float32)
    weights[30:] = 0.0  # padding tokens
    weights[ids >= E // 2] = 0.0  # another shard's experts
    x = rng.normal(size=(T, D)).astype(np.float32)
    gate, up, down = (rng.normal(size=(E, F, D)).astype(np.float32) / 4 for _ in range(3))
    args = [jnp.asarray(a) for a in (x, weights, ids, gate, up, down)]
    grouped, real = [], jax.lax.ragged_dot_general

    def spy(lhs, rhs, group_sizes, *a, **kw):
        grouped.append(int(np.asarray(group_sizes).sum()))
        return real(lhs, rhs, group_sizes, *a, **kw)

    monkeypatch.setattr(jax.lax, 'ragged_dot_general', spy)
    got = experts_grouped(*args)  # eagerly, so that the group sizes are concrete
    assert len(grouped) >= 2 and set(grouped) == {int((weights > 0).sum())} and grouped[0] < T * k
    np.testing.assert_allclose(np.asarray(got), np.asarray(experts_dense(*args)), rtol=1e-5,
                               atol=1e-5)
