"""GlmConfig.from_hf: both config spellings, derived sizes, and errors that name the key."""

import dataclasses
import json

import pytest

from glmjax import ConfigError, GlmConfig
from glmjax.config import PRESETS


def write(tmp_path, raw):
    (tmp_path / 'config.json').write_text(json.dumps(raw))
    return tmp_path


def test_legacy_and_rope_parameters_spellings_agree(tmp_path):
    legacy = dict(PRESETS['glm-4.6'])
    modern = {k: v for k, v in legacy.items() if k not in ('rope_theta', 'partial_rotary_factor')}
    modern['rope_parameters'] = {'rope_type': 'default', 'rope_theta': 1e6,
                                 'partial_rotary_factor': 0.5}
    a = GlmConfig.from_hf(write(tmp_path, legacy))
    b = GlmConfig.from_dict(modern)
    assert a == b
    assert a.rope_theta == 1e6 and a.rotary_dim == 64 and a.head_dim == 128
    assert a.eos_token_ids == (151329, 151336, 151338)
    # The file path itself works as well as the directory.
    assert GlmConfig.from_hf(tmp_path / 'config.json') == a


def test_glm46_values_and_derived_sizes():
    cfg = GlmConfig.preset('glm-4.6')
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts) == (5120, 92, 160)
    assert cfg.q_per_kv == 12 and cfg.shared_intermediate_size == 1536
    assert not cfg.is_moe_layer(2) and cfg.is_moe_layer(3) and cfg.is_moe_layer(92)
    air = GlmConfig.preset('glm-4.5-air')
    assert air.use_qk_norm is False and air.routed_scaling_factor == 1.0


def test_head_dim_defaults_to_width_over_heads():
    raw = {k: v for k, v in PRESETS['glm-4.5-air'].items() if k != 'head_dim'}
    raw['num_attention_heads'] = 32
    assert GlmConfig.from_dict(raw).head_dim == 4096 // 32


@pytest.mark.parametrize('change, words', [
    ({'model_type': 'llama'}, ["'model_type'", 'glm4_moe']),
    ({'hidden_size': None}, ['hidden_size', 'missing']),
    ({'n_routed_experts': '160'}, ["'n_routed_experts'", 'int']),
    ({'rope_theta': None}, ["'rope_theta'", 'missing']),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4}}, ['yarn', 'not supported']),
    ({'hidden_act': 'gelu'}, ["'hidden_act'", 'silu']),
    ({'tie_word_embeddings': True}, ["'tie_word_embeddings'"]),
    ({'num_key_value_heads': 7}, ["'num_key_value_heads'"]),
    ({'n_group': 3}, ["'n_group'"]),
    ({'num_experts_per_tok': 200}, ["'num_experts_per_tok'"]),
    ({'use_qk_norm': 'yes'}, ["'use_qk_norm'", 'bool']),
])
def test_bad_config_names_the_key(tmp_path, change, words):
    raw = {**PRESETS['glm-4.6'], **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        GlmConfig.from_hf(write(tmp_path, raw))
    for w in words:
        assert w in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match='no config.json'):
        GlmConfig.from_hf(tmp_path)
    (tmp_path / 'config.json').write_text('{not json')
    with pytest.raises(ConfigError, match='not valid JSON'):
        GlmConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match='unknown preset'):
        GlmConfig.preset('glm-9')


def test_config_is_frozen_and_hashable():
    cfg = GlmConfig.preset('glm-4.6')
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1
    assert hash(cfg) == hash(dataclasses.replace(cfg))


def test_generation_config_eos_ids_take_precedence(tmp_path):
    raw = dict(PRESETS['glm-4.6'], eos_token_id=151329)
    write(tmp_path, raw)
    assert GlmConfig.from_hf(tmp_path).eos_token_ids == (151329,)
    # As transformers' generate: the generation config says where a turn ends.
    (tmp_path / 'generation_config.json').write_text(json.dumps(
        {'eos_token_id': [151329, 151336, 151338], 'pad_token_id': 151329}))
    assert GlmConfig.from_hf(tmp_path).eos_token_ids == (151329, 151336, 151338)
    (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': 7}))
    assert GlmConfig.from_hf(tmp_path / 'config.json').eos_token_ids == (7,)
    (tmp_path / 'generation_config.json').write_text(json.dumps({'temperature': 0.6}))
    assert GlmConfig.from_hf(tmp_path).eos_token_ids == (151329,)


def test_bad_generation_config_names_the_file(tmp_path):
    write(tmp_path, PRESETS['glm-4.6'])
    (tmp_path / 'generation_config.json').write_text('{"eos_token_id": [1,')
    with pytest.raises(ConfigError, match='generation_config.json is not valid JSON'):
        GlmConfig.from_hf(tmp_path)
    (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': ['</s>']}))
    with pytest.raises(ConfigError, match=r"generation_config.json: 'eos_token_id' must be"):
        GlmConfig.from_hf(tmp_path)
