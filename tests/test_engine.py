"""The engine without a server: on a mesh, with chunked prefill and a bounded KV read, it
produces the same tokens as `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import generate, hidden_states, sharding
from glmjax.demo import tiny_glm46
from glmjax.model import init_params
from glmjax.serving.engine import GlmEngine, SlotSettings


@pytest.fixture(scope='module')
def model():
    cfg = tiny_glm46()
    return cfg, init_params(cfg, jnp.float32, seed=1)


def run(engine: GlmEngine, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy, every prompt in its own slot, all decoded together."""
    out = [[] for _ in prompts]
    for slot, p in enumerate(prompts):
        first = engine.insert(engine.prefill(p), slot, SlotSettings(max_new=max_new,
                                                                     temperature=0.0))
        out[slot].append(int(np.asarray(first.tokens)[0, 0]))
    while any(len(o) < max_new for o in out):
        step = engine.generate()
        tokens, valid = np.asarray(step.tokens), np.asarray(step.valid)
        for slot in range(len(prompts)):
            out[slot] += tokens[slot][valid[slot]].tolist()
    return [o[:max_new] for o in out]


def prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 1000, n).tolist() for n in lengths]


@pytest.mark.parametrize('mesh', [None, {'expert': 4, 'tensor': 2}, {'data': 2, 'expert': 4}])
def test_chunked_prefill_on_a_mesh_equals_generate(model, mesh):
    cfg, params = model
    ps = prompts([40, 7, 33, 16])
    want = generate(cfg, params, ps, 12, stop_ids=())
    if mesh is not None:
        mesh = sharding.make_mesh(mesh)
        params = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    engine = GlmEngine(cfg, params, max_batch=4, max_seq_len=64, steps_per_call=3, mesh=mesh,
                       prefill_chunk=16)
    assert run(engine, ps, 12) == want
    if mesh is not None:
        shards = {s.data.shape for s in engine.state.cache.k[0].addressable_shards}
        assert shards == {sharding.cache_shardings(
            cfg, mesh, engine.state.cache).k[0].shard_shape(engine.state.cache.k[0].shape)}


@pytest.mark.parametrize('mesh', [{'expert': 4, 'tensor': 2}, {'data': 2, 'expert': 4}])
def test_embeddings_on_a_mesh_equal_one_device(model, mesh):
    cfg, params = model
    ps = prompts([3, 40, 17, 1, 9])
    alone = GlmEngine(cfg, params, max_batch=2, max_seq_len=64).embed(ps)
    h = [np.asarray(hidden_states(cfg, params, jnp.asarray([p])))[0].mean(0) for p in ps]
    np.testing.assert_allclose(alone, [v / np.linalg.norm(v) for v in h], atol=1e-5)
    mesh = sharding.make_mesh(mesh)
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    engine = GlmEngine(cfg, sharded, max_batch=2, max_seq_len=64, mesh=mesh)
    np.testing.assert_allclose(engine.embed(ps), alone, atol=1e-5)


def test_decode_reads_only_the_filled_part_of_the_cache(model, monkeypatch):
    cfg, params = model
    engine = GlmEngine(cfg, params, max_batch=2, max_seq_len=512, steps_per_call=4)
    assert engine.kv_buckets == (128, 256, 512)
    used = []
    decode = engine._decode
    monkeypatch.setattr(engine, '_decode', lambda kv_len: used.append(kv_len) or decode(kv_len))
    ps = prompts([20, 120])
    want = generate(cfg, params, ps, 16, stop_ids=())
    assert run(engine, ps, 16) == want
    # 120 prompt tokens + 4 per call: 128 covers the first two calls, then 256.
    assert used == [128, 128, 256, 256]
    engine.free(1)
    assert engine.kv_bucket(int(engine._bound.max()) + 4) == 128
