"""Sharded equals unsharded on 8 simulated CPU devices, each device holds only its share of
the experts, and meshes or rules that cannot work fail with errors that say what to change."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from glmjax import GlmConfig, cache_shapes, decode, forward, init_cache, load_hf, prefill, sharding
from glmjax.moe import EXPERT_IMPLS, experts_parallel
from glmjax.sharding import MeshError, Rules, RulesError

# 16 experts, 8 query heads, widths that divide by 8; 2 KV heads (replicated at tensor=8).
TINY = dict(n_routed_experts=16, num_experts_per_tok=4, num_attention_heads=8,
            num_key_value_heads=2)
MESHES = {'expert8': {'expert': 8}, 'tensor8': {'tensor': 8},
          'expert4_tensor2': {'expert': 4, 'tensor': 2},
          'data2_expert2_tensor2': {'data': 2, 'expert': 2, 'tensor': 2}}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('tiny16'))
    return hf_tiny.save(hf_tiny.make_model(seed=7, **TINY), path)


@pytest.fixture(scope='module')
def cfg(checkpoint):
    return GlmConfig.from_hf(checkpoint)


@pytest.fixture(scope='module')
def single(checkpoint, cfg):
    """Logits of the unsharded model on one device: forward, prefill, then 4 decode steps."""
    params = load_hf(checkpoint, cfg, jnp.float32)
    return run(cfg, params, init_cache(cfg, 4, 32, jnp.float32))


def sequences(cfg):
    return np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 14)).astype(np.int32)


def run(cfg, params, cache):
    """forward over whole rows; prefill of ragged prompts; 4 decode steps. All logits."""
    seqs = sequences(cfg)
    lengths = np.array([3, 10, 7, 1], np.int32)
    prompts = np.where(np.arange(10) < lengths[:, None], seqs[:, :10], 0)
    out = {'forward': forward(cfg, params, jnp.asarray(seqs))}
    out['prefill'], cache = prefill(cfg, params, jnp.asarray(prompts), jnp.asarray(lengths),
                                    cache)
    for step in range(4):
        logits, cache = decode(cfg, params, jnp.asarray(seqs[np.arange(4), lengths + step]),
                               cache)
        out[f'decode{step}'] = logits
    return {k: np.asarray(v) for k, v in out.items()}, cache


@pytest.mark.parametrize('name, rules', [(name, 'decode_ep') for name in MESHES] + [
    ('expert8', 'ep_tp'), ('data2_expert2_tensor2', 'ep_tp')])
def test_sharded_equals_single_device(name, rules, checkpoint, cfg, single):
    mesh = sharding.make_mesh(MESHES[name])
    params = load_hf(checkpoint, cfg, jnp.float32,
                     shardings=sharding.param_shardings(cfg, mesh, rules))
    shardings = sharding.cache_shardings(cfg, mesh, cache_shapes(cfg, 4, 32, jnp.float32),
                                         rules)
    cache = jax.device_put(init_cache(cfg, 4, 32, jnp.float32), shardings)
    with jax.set_mesh(mesh):
        got, cache = run(cfg, params, cache)
        jaxpr = str(jax.make_jaxpr(forward, static_argnums=0)(cfg, params,
                                                              sequences(cfg)))
    want, _ = single
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5, err_msg=key)
    # Expert parallelism (shard_map + psum) exactly when the mesh has an expert axis.
    assert ('shard_map' in jaxpr) == (mesh.shape['expert'] > 1)
    assert cache.k[0].sharding.is_equivalent_to(shardings.k[0], 4)

    # Each device holds only its share: E / expert experts, F / tensor of each one's width.
    E, F, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    share = (E // mesh.shape['expert'], F // mesh.shape['tensor'], D)
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        for w in ('gate', 'up', 'down'):
            shards = params['model']['layers'][layer]['mlp'][w].addressable_shards
            assert len(shards) == 8 and {s.data.shape for s in shards} == {share}
    firsts = {s.index[0].start or 0 for s in params['model']['layers'][1]['mlp']['gate']
              .addressable_shards}
    assert firsts == set(range(0, E, share[0]))


@pytest.mark.parametrize('impl', EXPERT_IMPLS)
def test_expert_parallel_equals_each_implementation(impl):
    T, k, E, F, D = 12, 3, 16, 8, 16
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (T, D))
    ids = jax.vmap(lambda key: jax.random.permutation(key, E)[:k])(jax.random.split(keys[1], T))
    weights = jax.random.uniform(keys[2], (T, k))
    gate, up, down = (jax.random.normal(key, (E, F, D)) / 4 for key in
                      (keys[3], keys[4], jax.random.fold_in(keys[4], 1)))  # outputs O(1)
    want = EXPERT_IMPLS[impl](x, weights, ids, gate, up, down)
    mesh = sharding.make_mesh({'expert': 8})
    with jax.set_mesh(mesh):
        got = jax.jit(experts_parallel, static_argnums=0)(impl, x, weights, ids, gate, up,
                                                           down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_kv_heads_beyond_their_count_are_replicated_loudly(cfg, caplog):
    mesh = sharding.make_mesh({'tensor': 8})
    with caplog.at_level(logging.WARNING, logger='glmjax.sharding.rules'):
        params = sharding.param_shardings(cfg, mesh)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and '2 KV heads do not split over mesh axis tensor=8' in warnings[0]
    attn = params['model']['layers'][0]['attn']
    assert attn['k'].spec == jax.P(None, None, None)
    assert attn['q'].spec == jax.P(None, 'tensor', None)
    # 2 ways they do split, silently.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='glmjax.sharding.rules'):
        cache = sharding.cache_shardings(cfg, sharding.make_mesh({'expert': 4, 'tensor': 2}),
                                         cache_shapes(cfg, 2, 16))
    assert not caplog.records and cache.k[0].spec == jax.P(None, 'tensor', None, None)


def test_full_size_glm46_shardings_split_the_experts():
    cfg = GlmConfig.preset('glm-4.6')
    shardings = sharding.param_shardings(cfg, sharding.make_mesh({'expert': 8}))
    gate = shardings['mtp']['layer']['mlp']['gate']
    assert gate.shard_shape((160, 1536, 5120)) == (20, 1536, 5120)
    assert shardings['model']['embed'].spec == jax.P(None, None)  # tensor=1: no split


def test_ep_tp_splits_attention_and_kv_over_the_expert_devices():
    """GLM-4.6 on 8 devices of an expert-only mesh: decode_ep holds every attention weight,
    the shared experts, the vocabulary and the whole KV cache on each device; ep_tp splits
    them 8 ways too (96 query heads, 8 kv heads, 151,552 tokens, the shared width 1,536)."""
    cfg = GlmConfig.preset('glm-4.6')
    mesh = sharding.make_mesh({'expert': 8})
    for rules, n in (('decode_ep', 1), ('ep_tp', 8)):
        s = sharding.param_shardings(cfg, mesh, rules)
        attn, layer = s['model']['layers'][5]['attn'], s['model']['layers'][5]['mlp']
        assert attn['q'].shard_shape((5120, 96, 128)) == (5120, 96 // n, 128)
        assert attn['k'].shard_shape((5120, 8, 128)) == (5120, 8 // n, 128)
        assert attn['o'].shard_shape((96, 128, 5120)) == (96 // n, 128, 5120)
        assert layer['shared']['gate'].shard_shape((5120, 1536)) == (5120, 1536 // n)
        assert layer['gate'].shard_shape((160, 1536, 5120)) == (20, 1536, 5120)
        assert s['model']['embed'].shard_shape((151552, 5120)) == (151552 // n, 5120)
        pages = sharding.pages_shardings(cfg, mesh, jax.ShapeDtypeStruct((8, 64, 16, 128),
                                                                         jnp.bfloat16), rules)
        assert pages.shard_shape((8, 64, 16, 128)) == (8 // n, 64, 16, 128)


def test_mesh_errors_say_what_to_change():
    with pytest.raises(MeshError, match='needs 6 devices but there are 8: choose sizes whose '
                                        'product is 8'):
        sharding.make_mesh({'expert': 3, 'tensor': 2})
    with pytest.raises(MeshError, match="unknown mesh axis 'experts'; the mesh axes are data, "
                                        'expert, tensor'):
        sharding.make_mesh({'experts': 8})
    with pytest.raises(MeshError, match='integers >= 1'):
        sharding.make_mesh({'expert': 0})
    with pytest.raises(MeshError, match='name=size'):
        sharding.parse_mesh('expert:8')
    with pytest.raises(MeshError, match="'expert' is given twice"):
        sharding.parse_mesh('expert=2,expert=4')
    assert sharding.parse_mesh('expert=4, tensor=2') == {'expert': 4, 'tensor': 2}
    mesh = sharding.make_mesh({'tensor': 2}, devices=jax.devices()[:2])
    assert dict(mesh.shape) == {'data': 1, 'expert': 1, 'tensor': 2}


def test_rules_errors_say_what_to_change(cfg):
    with pytest.raises(RulesError, match=r"Rules.q_heads = 'model' is not a mesh axis; use one "
                                         r'of data, expert, tensor or None'):
        Rules(q_heads='model')
    with pytest.raises(RulesError, match="split experts only over the 'expert' mesh axis"):
        Rules(experts='tensor')
    with pytest.raises(RulesError, match="unknown logical axis 'heads'"):
        Rules.preset('decode_ep', heads='tensor')
    with pytest.raises(RulesError, match="unknown rules preset 'fast'; known: decode_ep"):
        sharding.param_shardings(cfg, sharding.make_mesh({'expert': 8}), rules='fast')
    with pytest.raises(RulesError, match=r"parameter model/embed: logical axes 'vocab' and "
                                         r"'embed' both map to mesh axis 'tensor'.*set "
                                         r'Rules.embed \(or Rules.vocab\)'):
        sharding.param_shardings(cfg, sharding.make_mesh({'tensor': 8}),
                                 Rules.preset('decode_ep', embed='tensor'))
    with pytest.raises(RulesError, match=r"mlp/down: dimension 0 \('experts', size 16\) does "
                                         r"not divide over mesh axis 'expert' of size 3; give "
                                         r"mesh axis 'expert' a size that divides 16"):
        sharding.param_shardings(cfg, sharding.make_mesh({'expert': 3}, jax.devices()[:3]))
    wide = dataclasses.replace(cfg, num_attention_heads=12, num_key_value_heads=2)
    with pytest.raises(RulesError, match=r"\('q_heads', size 12\) does not divide over mesh "
                                         r"axis 'tensor' of size 8.*Rules.q_heads=None"):
        sharding.param_shardings(wide, sharding.make_mesh({'tensor': 8}))
    with pytest.raises(RulesError, match='the rules leave experts unsharded but the mesh has '
                                         'expert=8'):
        sharding.param_shardings(cfg, sharding.make_mesh({'expert': 8}), 'prefill_tp')
    with pytest.raises(RulesError, match=r"cache k\[0\]: dimension 0 \('batch', size 3\) does "
                                         r"not divide over mesh axis 'data' of size 2"):
        sharding.cache_shardings(cfg, sharding.make_mesh({'data': 2, 'expert': 4}),
                                 cache_shapes(cfg, 3, 16))
    with pytest.raises(RulesError, match="logical axis 'rows' has no rule"):
        sharding.partition_spec(Rules(), sharding.make_mesh({'data': 8}), ('rows',), (8,), 'x')
