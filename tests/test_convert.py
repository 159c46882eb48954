"""glmjax-convert and load_checkpoint: round trip against transformers, sharded / fused / FP8 /
MTP inputs, kill -9 and --resume, bad inputs and output directories."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_tiny
from glmjax import CheckpointError, GlmConfig, forward, load_checkpoint, load_hf
from glmjax.checkpoint import COMPLETE, PARAMS
from glmjax.convert.convert import ConvertError, convert
from glmjax.convert.verify import mesh_shardings, verify
from glmjax.hf import SafetensorsDir, hf_tensor_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = {'tokenizer.json': '{"model": "tiny"}', 'tokenizer_config.json': '{}',
        'chat_template.jinja': '[gMASK]<sop>{{ messages }}'}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A transformers model saved in several safetensors files with an index, plus
    tokenizer and template files, and its fp32 conversion."""
    base = tmp_path_factory.mktemp('tiny')
    model = hf_tiny.make_model(seed=5)
    hf = hf_tiny.save(model, base / 'hf', max_shard_size='50KB')
    for name, text in SIDE.items():
        (hf / name).write_text(text)
    manifest = convert(str(hf), str(base / 'out'), dtype='fp32', workers=3)
    return model, hf, base / 'out', manifest


def padded(prompts):
    T = max(len(p) for p in prompts)
    out = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out


def assert_logits_match(model, cfg, params):
    prompts = hf_tiny.prompts(cfg.vocab_size)
    ours = np.asarray(forward(cfg, params, jnp.asarray(padded(prompts))))
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(ours[i, :len(p)], hf_tiny.torch_logits(model, p),
                                   rtol=0, atol=1e-4)


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def run_cli(*args, kill=None, cwd=None):
    env = {**os.environ, 'PYTHONPATH': ROOT}
    env.pop('GLMJAX_CONVERT_KILL', None)
    if kill:
        env['GLMJAX_CONVERT_KILL'] = kill
    return subprocess.run([sys.executable, '-m', 'glmjax.convert.convert', *map(str, args)],
                          env=env,
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_round_trip_from_sharded_input_matches_transformers(tiny):
    model, hf, out, manifest = tiny
    assert len([f for f in os.listdir(hf) if f.endswith('.safetensors')]) > 2
    assert (hf / 'model.safetensors.index.json').exists()
    cfg, params = load_checkpoint(out)
    assert_logits_match(model, cfg, params)
    assert_same_params(params, load_hf(hf, cfg, jnp.float32))
    for name, text in SIDE.items():
        assert (out / name).read_text() == text
    assert json.loads((out / 'config.json').read_text()) == json.loads(
        (hf / 'config.json').read_text())
    assert (out / 'generation_config.json').exists()
    assert sorted(manifest['items']) == ['layer_000', 'layer_001', 'layer_002', 'model']
    assert manifest['items']['layer_001']['mlp.gate']['shape'] == [8, 32, 64]  # [E, F, D]
    assert manifest['mtp'] is None and manifest['quantization'] is None


def test_restore_onto_a_mesh(tiny):
    model, _, out, _ = tiny
    mesh = jax.make_mesh((4, 2), ('expert', 'tensor'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    cfg = GlmConfig.from_hf(out)
    shardings = mesh_shardings(cfg, mesh)
    cfg, params = load_checkpoint(out, shardings=shardings)
    gate = params['model']['layers'][1]['mlp']['gate']  # [E=8, D, F=32]
    assert gate.sharding == shardings['model']['layers'][1]['mlp']['gate']
    assert gate.sharding.spec[0] == 'expert'
    assert {s.data.shape[0] for s in gate.addressable_shards} == {2}
    assert_logits_match(model, cfg, params)


def test_both_loaders_take_the_same_placement_arguments(tiny):
    _, hf, out, _ = tiny
    mesh = jax.make_mesh((4, 2), ('expert', 'tensor'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    cfg, restored = load_checkpoint(out, dtype=jnp.float32, mesh=mesh, rules='decode_ep')
    loaded = load_hf(hf, cfg, jnp.float32, mesh=mesh, rules='decode_ep')
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(loaded)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored['model']['layers'][1]['mlp']['gate'].sharding.spec[0] == 'expert'
    with pytest.raises(ValueError, match='not both'):
        load_hf(hf, cfg, mesh=mesh, shardings={})


def test_bf16_conversion_keeps_router_fp32(tiny, tmp_path):
    _, hf, _, _ = tiny
    convert(str(hf), str(tmp_path / 'out'))
    cfg, params = load_checkpoint(tmp_path / 'out')
    moe = params['model']['layers'][1]['mlp']
    assert moe['router'].dtype == jnp.float32 and moe['gate'].dtype == jnp.bfloat16
    assert_same_params(params, load_hf(hf, cfg, jnp.bfloat16))
    # dtype= casts on restore: fp32 arrays holding exactly the stored bf16 values.
    _, wide = load_checkpoint(tmp_path / 'out', dtype=jnp.float32)
    assert wide['model']['embed'].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(wide['model']['embed']),
                                  np.asarray(params['model']['embed'], np.float32))


def test_transformers5_fused_experts_convert(tiny, tmp_path):
    model, hf, out, _ = tiny
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert 'model.layers.1.mlp.experts.gate_up_proj' in state  # [E, 2F, D] in memory
    src = tmp_path / 'fused'
    src.mkdir()
    save_file(state, str(src / 'model.safetensors'))
    (src / 'config.json').write_text((hf / 'config.json').read_text())
    convert(str(src), str(tmp_path / 'out'), dtype='fp32')
    assert_same_params(load_checkpoint(tmp_path / 'out')[1], load_checkpoint(out)[1])


def with_mtp_layer(hf, dst) -> GlmConfig:
    """The tiny checkpoint plus an MTP layer (random), as GLM-4.6 ships one, with the
    embedding and head copies some MTP checkpoints carry."""
    raw = json.loads((hf / 'config.json').read_text())
    raw['num_nextn_predict_layers'] = 1
    dst.mkdir()
    (dst / 'config.json').write_text(json.dumps(raw))
    cfg = GlmConfig.from_hf(dst)
    ckpt = SafetensorsDir(hf)
    tensors = {name: ckpt.read(name) for name in ckpt.shapes}
    rng = np.random.default_rng(0)
    for name, shape in hf_tensor_shapes(cfg).items():
        if name not in tensors:
            tensors[name] = rng.standard_normal(shape).astype(np.float32) * 0.1
    L = cfg.num_hidden_layers
    tensors[f'model.layers.{L}.embed_tokens.weight'] = tensors['model.embed_tokens.weight']
    tensors[f'model.layers.{L}.shared_head.head.weight'] = tensors['lm_head.weight']
    save_file(tensors, str(dst / 'model.safetensors'))
    return cfg


def test_mtp_layer_is_kept_and_reuses_main_embedding(tiny, tmp_path):
    _, hf, _, _ = tiny
    cfg = with_mtp_layer(hf, tmp_path / 'hf')
    manifest = convert(str(tmp_path / 'hf'), str(tmp_path / 'out'), dtype='fp32')
    L = cfg.num_hidden_layers
    assert manifest['mtp']['reuses'] == {f'model.layers.{L}.embed_tokens': 'model.embed',
                                         f'model.layers.{L}.shared_head.head': 'model.lm_head'}
    assert sorted(manifest['mtp']['ignored_source_tensors']) == [
        f'model.layers.{L}.embed_tokens.weight', f'model.layers.{L}.shared_head.head.weight']
    _, params = load_checkpoint(tmp_path / 'out')
    assert set(params) == {'model', 'mtp'}
    assert_same_params(params, load_hf(tmp_path / 'hf', cfg, jnp.float32))


# --- FP8 ----------------------------------------------------------------------------------

def is_quantizable(name: str, shape) -> bool:
    """The linear weights an FP8 release quantizes (not the router, embedding or head)."""
    return (len(shape) == 2 and name.endswith('proj.weight') and 'layers' in name)


def quantize_channel(w):
    scale = np.abs(w).max(1, keepdims=True) / 448.0  # [out, 1], E4M3's largest value
    q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    # The dequantized value, worked out here independently: fp32(q) * scale per row.
    return q, scale.astype(np.float32), q.astype(np.float32) * scale


def quantize_block(w, block):
    out, inp = w.shape
    nb = (-(-out // block), -(-inp // block))
    scale = np.zeros(nb, np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    deq = np.zeros(w.shape, np.float32)
    for i in range(nb[0]):
        for j in range(nb[1]):
            sl = np.s_[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = np.abs(w[sl]).max() / 448.0
            q[sl] = (w[sl] / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
            deq[sl] = q[sl].astype(np.float32) * scale[i, j]
    return q, scale, deq


@pytest.mark.parametrize('layout', ['channel', 'block'])
def test_fp8_weights_are_dequantized_exactly(tiny, tmp_path, layout):
    _, hf, _, _ = tiny
    tensors = {k: v for f in os.listdir(hf) if f.endswith('.safetensors')
               for k, v in load_file(str(hf / f)).items()}
    raw = json.loads((hf / 'config.json').read_text())
    block = 24  # does not divide 64 or 32: the last block of each matrix is partial
    if layout == 'block':
        raw['quantization_config'] = {'quant_method': 'fp8', 'weight_block_size': [block] * 2}
    fp8, expected = {}, {}
    for name, w in tensors.items():
        if not is_quantizable(name, w.shape):
            fp8[name] = expected[name] = w
            continue
        if layout == 'channel':
            fp8[name], fp8[name + '_scale'], expected[name] = quantize_channel(w)
            fp8[name.removesuffix('weight') + 'input_scale'] = np.ones((1,), np.float32)
        else:
            fp8[name], fp8[name + '_scale_inv'], expected[name] = quantize_block(w, block)
    for name, t in (('fp8', fp8), ('expected', expected)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / 'model.safetensors'))
        (tmp_path / name / 'config.json').write_text(json.dumps(raw))
    # safetensors 0.8 writes F8_E4M3 from numpy (reading it is done by SafetensorsDir).
    q = 'model.layers.0.self_attn.q_proj.weight'
    assert SafetensorsDir(tmp_path / 'fp8').dtypes[q] == 'F8_E4M3'
    np.testing.assert_array_equal(SafetensorsDir(tmp_path / 'fp8').read_raw(q).view(np.uint8),
                                  fp8[q].view(np.uint8))

    manifest = convert(str(tmp_path / 'fp8'), str(tmp_path / 'out'), dtype='fp32')
    n_quantized = sum(is_quantizable(k, v.shape) for k, v in tensors.items())
    assert manifest['quantization']['tensors_by_dtype'] == {'F8_E4M3': n_quantized}
    assert manifest['quantization']['scales_by_layout'] == {layout: n_quantized}
    assert 'quantization_config' not in json.loads((tmp_path / 'out/config.json').read_text())
    cfg, params = load_checkpoint(tmp_path / 'out')
    reference = load_hf(tmp_path / 'expected', cfg, jnp.float32)
    assert_same_params(params, reference)
    # load_hf reads the FP8 checkpoint through the same code.
    assert_same_params(load_hf(tmp_path / 'fp8', cfg, jnp.float32), reference)
    assert not np.array_equal(np.asarray(params['model']['layers'][0]['attn']['q']),
                              np.asarray(load_hf(hf, cfg, jnp.float32)['model']['layers'][0]
                                         ['attn']['q']))  # really quantized


def test_fp8_weight_without_scale_is_an_error(tiny, tmp_path):
    _, hf, _, _ = tiny
    tensors = {k: v for f in os.listdir(hf) if f.endswith('.safetensors')
               for k, v in load_file(str(hf / f)).items()}
    name = 'model.layers.2.mlp.experts.3.down_proj.weight'
    tensors[name] = tensors[name].astype(ml_dtypes.float8_e4m3fn)
    save_file(tensors, str(tmp_path / 'model.safetensors'))
    (tmp_path / 'config.json').write_text((hf / 'config.json').read_text())
    with pytest.raises(CheckpointError, match=f'{name} is F8_E4M3 but has no {name}_scale'):
        convert(str(tmp_path), str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


# --- crash safety -------------------------------------------------------------------------

def test_kill_and_resume_gives_the_same_checkpoint(tiny, tmp_path):
    """SIGKILL at one point after another (items: 0 model, 1 layer_000, 2 layer_001, ...),
    resuming each time; then compare every array with an uninterrupted conversion."""
    _, hf, reference, reference_manifest = tiny
    out = tmp_path / 'out'
    kills = ['started:0', 'saving:1', 'saved:1', 'recorded:2', 'done:2', 'before_complete:0']
    for i, kill in enumerate(kills):
        r = run_cli('--hf_dir', hf, '--out', 'out', '--dtype', 'fp32',  # relative --out
                    *(['--resume'] if i else []), kill=kill, cwd=tmp_path)
        assert r.returncode == -9, (kill, r.stderr)
        assert not (out / COMPLETE).exists()
        with pytest.raises(CheckpointError, match='unfinished conversion.*--resume'):
            load_checkpoint(out)
        if kill in ('saving:1', 'saved:1'):  # a partial item is left behind
            assert any(e.startswith('layer_000.partial') for e in os.listdir(out / PARAMS))
    r = run_cli('--hf_dir', hf, '--out', 'out', '--dtype', 'fp32', '--resume', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '(done before, kept)' in r.stderr and 'done:' in r.stderr
    assert sorted(os.listdir(out / PARAMS)) == ['layer_000', 'layer_001', 'layer_002', 'model']
    assert_same_params(load_checkpoint(out)[1], load_checkpoint(reference)[1])
    manifest = json.loads((out / COMPLETE).read_text())
    assert manifest['items'] == reference_manifest['items']


def test_output_directory_rules(tiny, tmp_path):
    _, hf, out, _ = tiny
    with pytest.raises(ConvertError, match='already exists.*--resume.*--overwrite'):
        convert(str(hf), str(out), dtype='fp32')
    with pytest.raises(ConvertError, match='different dtype float32 \\(now bfloat16\\)'):
        convert(str(hf), str(out), dtype='bf16', resume=True)
    other = tmp_path / 'not_ours'
    other.mkdir()
    (other / 'precious.txt').write_text('keep me')
    with pytest.raises(ConvertError, match='refusing to delete'):
        convert(str(hf), str(other), overwrite=True)
    assert (other / 'precious.txt').exists()
    with pytest.raises(ConvertError, match='not implemented.*dequantized'):
        convert(str(hf), str(tmp_path / 'x'), dtype='fp8')
    with pytest.raises(CheckpointError, match='not a glmjax checkpoint'):
        load_checkpoint(other)


def test_damaged_manifest_is_refused(tiny, tmp_path):
    _, hf, _, _ = tiny
    out = tmp_path / 'out'
    convert(str(hf), str(out), dtype='fp32')
    manifest = json.loads((out / COMPLETE).read_text())
    manifest['items']['layer_001']['mlp.gate']['shape'] = [8, 64, 33]
    (out / COMPLETE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match='does not match its own sha256'):
        load_checkpoint(out)


# --- bad input ----------------------------------------------------------------------------

def single_file_copy(hf, dst, edit):
    tensors = {k: v for f in os.listdir(hf) if f.endswith('.safetensors')
               for k, v in load_file(str(hf / f)).items()}
    edit(tensors)
    dst.mkdir()
    save_file(tensors, str(dst / 'model.safetensors'))
    (dst / 'config.json').write_text((hf / 'config.json').read_text())
    return dst


@pytest.mark.parametrize('edit, words', [
    (lambda t: t.pop('model.layers.1.mlp.experts.5.up_proj.weight'),
     ['missing', 'model.layers.1.mlp.experts.5.up_proj.weight']),
    (lambda t: t.update({'model.layers.0.mlp.extra.weight': np.zeros(3, np.float32)}),
     ['unexpected', 'model.layers.0.mlp.extra.weight', 'model.safetensors']),
    (lambda t: t.update({'model.layers.2.self_attn.k_proj.weight': np.zeros((16, 64),
                                                                          np.float32)}),
     ['mis-shaped', 'model.layers.2.self_attn.k_proj.weight', 'model.safetensors', '(16, 64)']),
], ids=['missing_expert', 'unknown_tensor', 'wrong_shape'])
def test_bad_input_is_named_and_nothing_is_written(tiny, tmp_path, edit, words):
    src = single_file_copy(tiny[1], tmp_path / 'hf', edit)
    with pytest.raises(CheckpointError) as e:
        convert(str(src), str(tmp_path / 'out'))
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / 'out').exists()


def test_truncated_file_fails_cleanly_on_the_command_line(tiny, tmp_path):
    _, hf, _, _ = tiny
    src = tmp_path / 'hf'
    src.mkdir()
    for f in os.listdir(hf):
        (src / f).write_bytes((hf / f).read_bytes())
    victim = sorted(f for f in os.listdir(src) if f.endswith('.safetensors'))[-1]
    size = (src / victim).stat().st_size
    os.truncate(src / victim, size - 100)
    r = run_cli('--hf_dir', src, '--out', tmp_path / 'out')
    assert r.returncode == 1
    assert f'{victim} is truncated: tensor' in r.stderr
    assert 'Traceback' not in r.stderr
    assert not (tmp_path / 'out').exists()


def test_verify_reports_pass_and_fail(tiny, capsys):
    _, hf, out, _ = tiny
    assert verify(str(hf), str(out))
    assert 'greedy agreement 100%' in capsys.readouterr().out
    assert not verify(str(hf), str(out), atol=1e-12)
    assert 'FAIL' in capsys.readouterr().out
