"""The model config: one frozen dataclass, read from a checkpoint's config.json.

Every shape in glmjax derives from `GlmConfig`. Values are read from the checkpoint, never
from class defaults: transformers' own defaults (rope_theta 10000, GLM-4.5-Air sizes) differ
from the released models.
"""

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
    """A config.json that glmjax cannot serve, with the key at fault named."""


@dataclasses.dataclass(frozen=True)
class GlmConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool
    use_qk_norm: bool
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int
    topk_group: int
    num_nextn_predict_layers: int
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        _check(self.num_attention_heads % self.num_key_value_heads == 0, 'num_key_value_heads',
               f'{self.num_attention_heads} query heads are not a multiple of '
               f'{self.num_key_value_heads} key/value heads')
        _check(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
               'partial_rotary_factor',
               f'{self.partial_rotary_factor} x head_dim {self.head_dim} is not an even size')
        _check(self.n_routed_experts % self.n_group == 0, 'n_group',
               f'{self.n_routed_experts} experts do not split into {self.n_group} groups')
        _check(1 <= self.topk_group <= self.n_group, 'topk_group',
               f'must be between 1 and n_group={self.n_group}, got {self.topk_group}')
        _check(self.n_group == 1 or self.n_routed_experts // self.n_group >= 2, 'n_group',
               'group-limited routing scores a group by its top 2 experts: groups need >= 2')
        experts_in_groups = self.topk_group * self.n_routed_experts // self.n_group
        _check(1 <= self.num_experts_per_tok <= experts_in_groups, 'num_experts_per_tok',
               f'must be between 1 and the {experts_in_groups} experts of the kept groups')
        _check(0 <= self.first_k_dense_replace <= self.num_hidden_layers, 'first_k_dense_replace',
               f'must be between 0 and num_hidden_layers={self.num_hidden_layers}')

    # Derived sizes. Letters as in every einsum: N query heads, K kv heads, H head dim.
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def is_moe_layer(self, i: int) -> bool:
        """Layer i uses the MoE block (the MTP layer, index num_hidden_layers, included)."""
        return i >= self.first_k_dense_replace

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> 'GlmConfig':
        """Reads a checkpoint directory or a config.json file."""
        path = os.fspath(path)
        file = os.path.join(path, 'config.json') if os.path.isdir(path) else path
        try:
            with open(file) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f'no config.json at {path}') from None
        except json.JSONDecodeError as e:
            raise ConfigError(f'{file} is not valid JSON: {e}') from None
        cfg = cls.from_dict(raw, source=file)
        eos = _generation_eos(os.path.join(os.path.dirname(file), 'generation_config.json'))
        return cfg if eos is None else dataclasses.replace(cfg, eos_token_ids=eos)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = 'config') -> 'GlmConfig':
        return _from_dict(raw, source)

    @classmethod
    def preset(cls, name: str) -> 'GlmConfig':
        """The published configs: 'glm-4.6', 'glm-4.5', 'glm-4.5-air'."""
        if name not in PRESETS:
            raise ConfigError(f'unknown preset {name!r}; known: {", ".join(PRESETS)}')
        return _from_dict(PRESETS[name], name)


def _eos(value: Any, source: str) -> tuple[int, ...]:
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{source}: 'eos_token_id' must be a token id or a list of them, "
                          f'got {value!r}')
    return tuple(ids)


def _generation_eos(file: str) -> tuple[int, ...] | None:
    """The eos ids of generation_config.json, which generation stops at (as transformers
    does); None without the file or the key."""
    try:
        with open(file) as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ConfigError(f'{file} is not valid JSON: {e}') from None
    value = raw.get('eos_token_id') if isinstance(raw, dict) else None
    return None if value is None else _eos(value, file)


def _check(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f'config key {key!r}: {message}')


_INT, _FLOAT, _BOOL = (int,), (int, float), (bool,)
_REQUIRED = {
    'vocab_size': _INT, 'hidden_size': _INT, 'intermediate_size': _INT,
    'num_hidden_layers': _INT, 'num_attention_heads': _INT, 'num_key_value_heads': _INT,
    'moe_intermediate_size': _INT, 'n_routed_experts': _INT, 'num_experts_per_tok': _INT,
    'first_k_dense_replace': _INT, 'max_position_embeddings': _INT, 'rms_norm_eps': _FLOAT,
}
# Keys that the released configs always carry but transformers' own saves may leave to
# class defaults; the defaults here are transformers' for model_type glm4_moe.
_OPTIONAL = {
    'n_shared_experts': (_INT, 1), 'n_group': (_INT, 1), 'topk_group': (_INT, 1),
    'norm_topk_prob': (_BOOL, True), 'routed_scaling_factor': (_FLOAT, 1.0),
    'use_qk_norm': (_BOOL, False), 'attention_bias': (_BOOL, False),
    'num_nextn_predict_layers': (_INT, 0),
}


def _get(raw: dict, key: str, types: tuple, source: str):
    value = raw[key]
    if not isinstance(value, types) or (types != _BOOL and isinstance(value, bool)):
        names = '/'.join(t.__name__ for t in types)
        raise ConfigError(f'{source}: config key {key!r} must be {names}, got {value!r}')
    return value


def _rope(raw: dict, source: str) -> tuple[float, float]:
    """transformers 4.x keeps rope keys at top level, 5.x in `rope_parameters`."""
    rope = dict(raw.get('rope_parameters') or {})
    scaling = raw.get('rope_scaling') or {}
    rope_type = rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type')
    if rope_type not in (None, 'default'):
        raise ConfigError(f'{source}: config key rope type {rope_type!r} is not supported '
                          '(GLM-4.x uses plain RoPE)')
    theta = rope.get('rope_theta', raw.get('rope_theta'))
    if theta is None:
        raise ConfigError(f"{source}: config key 'rope_theta' is missing "
                          "(looked at top level and in 'rope_parameters')")
    factor = rope.get('partial_rotary_factor', raw.get('partial_rotary_factor', 0.5))
    for key, value in (('rope_theta', theta), ('partial_rotary_factor', factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f'{source}: config key {key!r} must be a positive number, '
                              f'got {value!r}')
    return float(theta), float(factor)


def _from_dict(raw: dict[str, Any], source: str) -> GlmConfig:
    if raw.get('model_type') != 'glm4_moe':
        raise ConfigError(f"{source}: config key 'model_type' must be 'glm4_moe' "
                          f"(Glm4MoeForCausalLM), got {raw.get('model_type')!r}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f'{source}: required config key(s) missing: {", ".join(missing)}')
    values = {k: _get(raw, k, t, source) for k, t in _REQUIRED.items()}
    for key, (types, default) in _OPTIONAL.items():
        values[key] = _get(raw, key, types, source) if raw.get(key) is not None else default
    if raw.get('hidden_act', 'silu') != 'silu':
        raise ConfigError(f"{source}: config key 'hidden_act' must be 'silu', "
                          f"got {raw['hidden_act']!r}")
    if raw.get('tie_word_embeddings', False):
        raise ConfigError(f"{source}: config key 'tie_word_embeddings' is true; GLM-4.x "
                          'checkpoints have an untied lm_head and glmjax expects one')
    head_dim = raw.get('head_dim') or values['hidden_size'] // values['num_attention_heads']
    values['rope_theta'], values['partial_rotary_factor'] = _rope(raw, source)
    eos = raw.get('eos_token_id')
    eos = () if eos is None else _eos(eos, source)
    try:
        return GlmConfig(head_dim=int(head_dim), eos_token_ids=eos,
                         pad_token_id=raw.get('pad_token_id'), **values)
    except ConfigError as e:
        raise ConfigError(f'{source}: {e}') from None


_GLM_COMMON = {
    'model_type': 'glm4_moe', 'architectures': ['Glm4MoeForCausalLM'], 'vocab_size': 151552,
    'num_attention_heads': 96, 'num_key_value_heads': 8, 'head_dim': 128,
    'partial_rotary_factor': 0.5, 'rope_theta': 1000000.0, 'rms_norm_eps': 1e-05,
    'attention_bias': True, 'n_shared_experts': 1, 'num_experts_per_tok': 8,
    'norm_topk_prob': True, 'n_group': 1, 'topk_group': 1, 'num_nextn_predict_layers': 1,
    'tie_word_embeddings': False, 'hidden_act': 'silu', 'eos_token_id': [151329, 151336, 151338],
    'pad_token_id': 151329, 'torch_dtype': 'bfloat16',
}
# The published config.json values (zai-org/GLM-4.6, GLM-4.5, GLM-4.5-Air).
PRESETS: dict[str, dict[str, Any]] = {
    'glm-4.6': {**_GLM_COMMON, 'hidden_size': 5120, 'num_hidden_layers': 92,
                'intermediate_size': 12288, 'moe_intermediate_size': 1536,
                'n_routed_experts': 160, 'first_k_dense_replace': 3,
                'routed_scaling_factor': 2.5, 'use_qk_norm': True,
                'max_position_embeddings': 202752},
    'glm-4.5': {**_GLM_COMMON, 'hidden_size': 5120, 'num_hidden_layers': 92,
                'intermediate_size': 12288, 'moe_intermediate_size': 1536,
                'n_routed_experts': 160, 'first_k_dense_replace': 3,
                'routed_scaling_factor': 2.5, 'use_qk_norm': True,
                'max_position_embeddings': 131072},
    'glm-4.5-air': {**_GLM_COMMON, 'hidden_size': 4096, 'num_hidden_layers': 46,
                    'intermediate_size': 10944, 'moe_intermediate_size': 1408,
                    'n_routed_experts': 128, 'first_k_dense_replace': 1,
                    'routed_scaling_factor': 1.0, 'use_qk_norm': False,
                    'max_position_embeddings': 131072},
}
