"""Hugging Face GLM-4.x checkpoints: tensor names, layouts, and `load_hf`.

One table maps each glmjax parameter to the Hugging Face tensor(s) it comes from; the
parameter's own declaration (shape, logical axes) is the check. Linear weights are stored
[out, in] by torch and [in..., out...] here. Routed experts are one tensor per expert in
the published checkpoints and fused (`experts.gate_up_proj [E, 2F, D]`, gate rows first,
`experts.down_proj [E, D, F]`) in transformers 5.x saves; both are read.
"""

import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 so safetensors can read it into numpy)
import numpy as np
from safetensors import safe_open

from glmjax.config import GlmConfig
from glmjax.model import abstract_params, has_mtp

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names files and tensors."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one parameter comes from.

    n_in: for a linear weight, how many leading dims of the glmjax shape are inputs (the HF
    tensor is [prod(out dims), prod(in dims)]); None for tensors kept as they are (norms,
    biases, embedding) up to a reshape. For experts, dims after the leading E.
    experts: per-expert names ('{e}' in place of the index) and the fused 5.x name with the
    part it holds, or None for a plain tensor.
    """
    name: str
    n_in: int | None = None
    flat: bool = False  # kept as a 1-D tensor by HF (attention biases)
    fused: tuple[str, str] | None = None  # (fused name, 'gate' | 'up' | 'down')


def _layer_sources(cfg: GlmConfig, i: int) -> dict[tuple, Source]:
    p = f'model.layers.{i}.'
    attn = {
        ('attn_norm', 'weight'): Source(p + 'input_layernorm.weight'),
        ('mlp_norm', 'weight'): Source(p + 'post_attention_layernorm.weight'),
        ('attn', 'q'): Source(p + 'self_attn.q_proj.weight', 1),
        ('attn', 'k'): Source(p + 'self_attn.k_proj.weight', 1),
        ('attn', 'v'): Source(p + 'self_attn.v_proj.weight', 1),
        ('attn', 'o'): Source(p + 'self_attn.o_proj.weight', 2),
        ('attn', 'q_bias'): Source(p + 'self_attn.q_proj.bias', flat=True),
        ('attn', 'k_bias'): Source(p + 'self_attn.k_proj.bias', flat=True),
        ('attn', 'v_bias'): Source(p + 'self_attn.v_proj.bias', flat=True),
        ('attn', 'q_norm', 'weight'): Source(p + 'self_attn.q_norm.weight'),
        ('attn', 'k_norm', 'weight'): Source(p + 'self_attn.k_norm.weight'),
    }
    if not cfg.is_moe_layer(i):
        mlp = {('mlp', w): Source(f'{p}mlp.{w}_proj.weight', 1) for w in ('gate', 'up', 'down')}
    else:
        fused = {'gate': 'gate_up_proj', 'up': 'gate_up_proj', 'down': 'down_proj'}
        mlp = {('mlp', 'router'): Source(p + 'mlp.gate.weight', 1),
               ('mlp', 'router_bias'): Source(p + 'mlp.gate.e_score_correction_bias')}
        for w in ('gate', 'up', 'down'):
            mlp['mlp', w] = Source(f'{p}mlp.experts.{{e}}.{w}_proj.weight', 1,
                                   fused=(f'{p}mlp.experts.{fused[w]}', w))
            mlp['mlp', 'shared', w] = Source(f'{p}mlp.shared_experts.{w}_proj.weight', 1)
    return {**attn, **mlp}


def sources(cfg: GlmConfig, mtp: bool | None = None) -> dict[tuple, Source]:
    """Parameter path (as in the params dict) -> Source, for every parameter."""
    mtp = has_mtp(cfg) if mtp is None else mtp
    table = {('model', 'embed'): Source('model.embed_tokens.weight'),
             ('model', 'norm', 'weight'): Source('model.norm.weight'),
             ('model', 'lm_head'): Source('lm_head.weight', 1)}
    for i in range(cfg.num_hidden_layers):
        for path, src in _layer_sources(cfg, i).items():
            table[('model', 'layers', i) + path] = src
    if mtp:
        L = cfg.num_hidden_layers
        p = f'model.layers.{L}.'
        table.update({('mtp', 'enorm', 'weight'): Source(p + 'enorm.weight'),
                      ('mtp', 'hnorm', 'weight'): Source(p + 'hnorm.weight'),
                      ('mtp', 'eh_proj'): Source(p + 'eh_proj.weight', 1),
                      ('mtp', 'head_norm', 'weight'): Source(p + 'shared_head.norm.weight')})
        for path, src in _layer_sources(cfg, L).items():
            table[('mtp', 'layer') + path] = src
    # The table names every tensor a GLM layer may have; the model's own declarations
    # (qk-norm, biases present or not) decide which are expected.
    declared = _flatten(abstract_params(cfg, mtp=mtp))
    return {path: src for path, src in table.items() if path in declared}


def mtp_ignored_names(cfg: GlmConfig) -> tuple[str, ...]:
    """Copies of the main embedding and lm_head some MTP layers carry; the main ones serve."""
    p = f'model.layers.{cfg.num_hidden_layers}.'
    return (p + 'embed_tokens.weight', p + 'shared_head.head.weight')


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def hf_shape(src: Source, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the (per-expert or plain) HF tensor for a glmjax parameter shape."""
    if '{e}' in src.name:
        shape = shape[1:]
    if src.flat:
        return (math.prod(shape),)
    if src.n_in is None:
        return shape
    return (math.prod(shape[src.n_in:]), math.prod(shape[:src.n_in]))


def hf_tensor_shapes(cfg: GlmConfig, mtp: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a checkpoint in the published (per-expert) layout, with shapes."""
    shapes = _flatten(abstract_params(cfg, mtp=mtp))
    out = {}
    for path, src in sources(cfg, mtp).items():
        shape = hf_shape(src, shapes[path].shape)
        if '{e}' in src.name:
            out.update({src.name.format(e=e): shape for e in range(cfg.n_routed_experts)})
        else:
            out[src.name] = shape
    return out


class SafetensorsDir:
    """The tensors of a checkpoint directory (one file, or shards with an index), read
    lazily: only headers are read up front."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f'{self.path} is not a checkpoint directory')
        index = os.path.join(self.path, 'model.safetensors.index.json')
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)['weight_map']
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f'{index} is not a safetensors index: {e}') from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith('.safetensors'))
            weight_map = None
        if not files:
            raise CheckpointError(f'no .safetensors files in {self.path}')
        self.files: dict[str, str] = {}  # tensor name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in files:
            for name, (shape, dtype) in self._header(file).items():
                if name in self.files:
                    raise CheckpointError(f'tensor {name} is in both {self.files[name]} '
                                          f'and {file}')
                self.files[name], self.shapes[name], self.dtypes[name] = file, shape, dtype
        if weight_map is not None:
            for name, file in weight_map.items():
                if self.files.get(name) != file:
                    raise CheckpointError(f'index says tensor {name} is in {file}, '
                                          f'but {file} has no such tensor')
        self._open: dict[str, object] = {}

    def _header(self, file: str) -> dict[str, tuple[tuple[int, ...], str]]:
        full = os.path.join(self.path, file)
        if not os.path.exists(full):
            raise CheckpointError(f'{full} is listed in the index but does not exist')
        try:
            with open(full, 'rb') as f:
                n = int.from_bytes(f.read(8), 'little')
                header = json.loads(f.read(n))
            size = os.path.getsize(full)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f'{full}: unreadable safetensors header: {e}') from None
        out = {}
        for name, info in header.items():
            if name == '__metadata__':
                continue
            if info['data_offsets'][1] + 8 + n > size:
                raise CheckpointError(f'{full} is truncated: tensor {name} ends past the end '
                                      'of the file')
            out[name] = (tuple(info['shape']), info['dtype'])
        return out

    def read(self, name: str) -> np.ndarray:
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.path, file), framework='np')
        try:
            return self._open[file].get_tensor(name)
        except Exception as e:  # safetensors raises several types on corrupt data
            raise CheckpointError(f'{file}: cannot read tensor {name}: {e}') from None


def _plan(cfg: GlmConfig, ckpt: SafetensorsDir, mtp: bool) -> dict[tuple, tuple]:
    """Checks every name and shape before anything is read. Returns path -> (how, names)."""
    shapes = _flatten(abstract_params(cfg, mtp=mtp))
    plan, missing, misshaped, used = {}, [], [], set()

    def check(name: str, expected: tuple[int, ...]) -> bool:
        if name not in ckpt.shapes:
            missing.append(name)
            return False
        used.add(name)
        if ckpt.shapes[name] != expected:
            misshaped.append(f'{name}: {ckpt.shapes[name]}, expected {expected}')
            return False
        return True

    for path, src in sources(cfg, mtp).items():
        shape = shapes[path].shape
        if src.fused and src.fused[0] in ckpt.shapes:
            fused_name, part = src.fused
            E, F, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
            check(fused_name, (E, 2 * F, D) if part != 'down' else (E, D, F))
            plan[path] = ('fused', (fused_name, part))
        elif '{e}' in src.name:
            names = [src.name.format(e=e) for e in range(cfg.n_routed_experts)]
            for name in names:
                check(name, hf_shape(src, shape))
            plan[path] = ('experts', names)
        else:
            check(src.name, hf_shape(src, shape))
            plan[path] = ('linear' if src.n_in else 'same', src.name)
    ignored = set(mtp_ignored_names(cfg)) if mtp else set()
    unexpected = sorted(set(ckpt.shapes) - used - ignored)
    problems = []
    for label, items in (('missing tensors', missing), ('mis-shaped tensors', misshaped),
                         ('unexpected tensors', unexpected)):
        if items:
            shown = '\n  '.join(items[:20]) + ('' if len(items) <= 20 else
                                                f'\n  ... and {len(items) - 20} more')
            problems.append(f'{len(items)} {label}:\n  {shown}')
    if problems:
        raise CheckpointError(f'checkpoint {ckpt.path} does not match the config:\n'
                              + '\n'.join(problems))
    return plan


def checkpoint_has_mtp(cfg: GlmConfig, ckpt: SafetensorsDir) -> bool:
    """transformers drops the MTP layer when it saves; such checkpoints load without it."""
    if not has_mtp(cfg):
        return False
    prefix = f'model.layers.{cfg.num_hidden_layers}.'
    found = any(name.startswith(prefix) for name in ckpt.shapes)
    if not found:
        log.warning('%s has no MTP layer (model.layers.%d.*): loading without it; '
                    'speculative decoding with MTP is unavailable', ckpt.path,
                    cfg.num_hidden_layers)
    return found


def read_param(ckpt: SafetensorsDir, how: str, what, shape: tuple[int, ...]) -> np.ndarray:
    """Reads and re-lays one parameter from its HF tensor(s)."""
    if how == 'same':
        return ckpt.read(what).reshape(shape)
    if how == 'linear':
        return ckpt.read(what).T.reshape(shape)
    if how == 'experts':
        return np.stack([ckpt.read(name).T for name in what]).reshape(shape)
    name, part = what
    t = ckpt.read(name)
    if part != 'down':
        F = t.shape[1] // 2
        t = t[:, :F] if part == 'gate' else t[:, F:]
    return np.ascontiguousarray(t.transpose(0, 2, 1))


def load_hf(path: str | os.PathLike, cfg: GlmConfig, dtype=jnp.bfloat16,
            shardings: dict | None = None) -> dict:
    """Reads a Hugging Face safetensors checkpoint into the params dict.

    Every name and shape is checked before any tensor is read. The router weight and its
    correction bias stay fp32; everything else is cast to `dtype`. `shardings`, a tree like
    the params of `jax.sharding.Sharding`s, places each weight directly where it belongs.
    """
    ckpt = SafetensorsDir(path)
    mtp = checkpoint_has_mtp(cfg, ckpt)
    plan = _plan(cfg, ckpt, mtp)
    abstract = _flatten(abstract_params(cfg, dtype, mtp=mtp))
    flat_shardings = _flatten(shardings) if shardings is not None else {}
    out = {}
    for path, (how, what) in plan.items():
        target = abstract[path]
        value = read_param(ckpt, how, what, target.shape).astype(target.dtype)
        out[path] = jax.device_put(value, flat_shardings.get(path))
    return _unflatten(out)
