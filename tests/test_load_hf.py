"""load_hf: sharded and fused inputs, the MTP layer, and errors that name the tensor."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_tiny
from glmjax import CheckpointError, GlmConfig, load_hf


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp('single')
    model = hf_tiny.make_model(seed=3)
    hf_tiny.save(model, path)
    cfg = GlmConfig.from_hf(path)
    return model, path, cfg, load_hf(path, cfg, dtype=jnp.float32)


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def copy_with(src, dst, edit):
    """Copies a single-file checkpoint, editing its tensor dict."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, 'model.safetensors'))
    edit(tensors)
    save_file(tensors, os.path.join(dst, 'model.safetensors'))
    with open(os.path.join(src, 'config.json')) as f:
        raw = json.load(f)
    with open(os.path.join(dst, 'config.json'), 'w') as f:
        json.dump(raw, f)
    return dst


def test_sharded_checkpoint_with_index(saved, tmp_path):
    model, _, cfg, reference = saved
    hf_tiny.save(model, tmp_path, max_shard_size='100KB')
    files = [f for f in os.listdir(tmp_path) if f.endswith('.safetensors')]
    assert len(files) > 2 and (tmp_path / 'model.safetensors.index.json').exists()
    assert_same_tree(load_hf(tmp_path, cfg, dtype=jnp.float32), reference)


def test_transformers5_fused_expert_names(saved, tmp_path):
    model, _, cfg, reference = saved
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(k.endswith('experts.gate_up_proj') for k in state)  # fused in memory
    save_file(state, str(tmp_path / 'model.safetensors'))
    (tmp_path / 'config.json').write_text(json.dumps(json.load(open(saved[1] / 'config.json'))))
    assert_same_tree(load_hf(tmp_path, cfg, dtype=jnp.float32), reference)


def test_bf16_load_keeps_router_fp32(saved):
    _, path, cfg, _ = saved
    params = load_hf(path, cfg, dtype=jnp.bfloat16)
    moe = params['model']['layers'][1]['mlp']
    assert moe['router'].dtype == jnp.float32 and moe['router_bias'].dtype == jnp.float32
    assert moe['gate'].dtype == jnp.bfloat16 and params['model']['embed'].dtype == jnp.bfloat16


@pytest.mark.parametrize('edit, words', [
    (lambda t: t.pop('model.layers.1.mlp.experts.5.up_proj.weight'),
     ['1 missing', 'model.layers.1.mlp.experts.5.up_proj.weight']),
    (lambda t: t.update({'model.layers.0.mlp.extra.weight': np.zeros(3, np.float32)}),
     ['1 unexpected', 'model.layers.0.mlp.extra.weight']),
    (lambda t: t.update({'model.layers.2.self_attn.k_proj.weight': np.zeros((16, 64),
                                                                          np.float32)}),
     ['mis-shaped', 'model.layers.2.self_attn.k_proj.weight', '(16, 64)', '(32, 64)']),
])
def test_bad_checkpoint_names_the_tensor(saved, tmp_path, edit, words):
    path = copy_with(saved[1], tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_hf(path, saved[2], dtype=jnp.float32)
    for w in words:
        assert w in str(e.value)


def test_truncated_file_is_named(saved, tmp_path):
    path = copy_with(saved[1], tmp_path, lambda t: None)
    file = path / 'model.safetensors'
    size = file.stat().st_size
    with open(file, 'r+b') as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match='model.safetensors.*truncated'):
        load_hf(path, saved[2], dtype=jnp.float32)


def test_no_weights_and_bad_index(tmp_path, saved):
    with pytest.raises(CheckpointError, match='no .safetensors files'):
        load_hf(tmp_path, saved[2])
    (tmp_path / 'model.safetensors.index.json').write_text(
        json.dumps({'weight_map': {'lm_head.weight': 'model-00001-of-00002.safetensors'}}))
    with pytest.raises(CheckpointError, match='model-00001-of-00002.safetensors.*does not exist'):
        load_hf(tmp_path, saved[2])


def test_checkpoint_without_mtp_layer_loads_without_it(saved, caplog):
    _, path, cfg, reference = saved
    with_mtp = dataclasses.replace(cfg, num_nextn_predict_layers=1)
    params = load_hf(path, with_mtp, dtype=jnp.float32)
    assert 'mtp' not in params
    assert 'no MTP layer' in caplog.text
    assert_same_tree(params, reference)


def test_partial_mtp_layer_is_an_error(saved, tmp_path):
    _, path, cfg, _ = saved
    L = cfg.num_hidden_layers
    edit = lambda t: t.update({f'model.layers.{L}.enorm.weight': np.ones(64, np.float32)})  # noqa: E731
    path = copy_with(path, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_hf(path, dataclasses.replace(cfg, num_nextn_predict_layers=1))
    assert f'model.layers.{L}.eh_proj.weight' in str(e.value)
    assert 'missing' in str(e.value)
