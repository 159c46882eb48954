"""Hugging Face GLM-4.x checkpoints: tensor names, layouts, and `load_hf`.

One table maps each glmjax parameter to the Hugging Face tensor(s) it comes from; the
parameter's own declaration (shape, logical axes) is the check. Linear weights are stored
[out, in] by torch and [in..., out...] here. Routed experts are one tensor per expert in
the published checkpoints and fused (`experts.gate_up_proj [E, 2F, D]`, gate rows first,
`experts.down_proj [E, D, F]`) in transformers 5.x saves; both are read.

Quantized weights (FP8 E4M3/E5M2 or int8) are dequantized while reading, the scale applied
in fp32: a `<name>_scale` of shape [..., out, 1] (compressed-tensors, per output channel) or
[] (per tensor), or a `<name>_scale_inv` with one value per block of 128x128 (DeepSeek style;
the block size comes from config.json's `quantization_config.weight_block_size` when present).
Scales (and activation `input_scale`s, unused here) are consumed, not "unexpected".
"""

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from glmjax.config import GlmConfig
from glmjax.model import abstract_params, has_mtp
from glmjax.sharding.rules import placement

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
            # Experts are [E, F, D] here: gate/up keep HF's [out, in], down is transposed.
            mlp['mlp', w] = Source(f'{p}mlp.experts.{{e}}.{w}_proj.weight',
                                   1 if w == 'down' else None,
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


# safetensors dtype names -> numpy. Quantized weights need a scale next to them.
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
           'BF16': ml_dtypes.bfloat16, 'F8_E4M3': ml_dtypes.float8_e4m3fn,
           'F8_E5M2': ml_dtypes.float8_e5m2, 'I8': np.int8}
QUANTIZED = ('F8_E4M3', 'F8_E5M2', 'I8')
DEFAULT_BLOCK = (128, 128)


class SafetensorsDir:
    """The tensors of a checkpoint directory (one file, or shards with an index), read
    lazily: only headers are read up front; each tensor is read with one positioned read
    (no mmap, so the memory in use is what has been read and not yet freed)."""

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
        self.offsets: dict[str, tuple[int, int]] = {}  # absolute [start, end) in the file
        for file in files:
            for name, (shape, dtype, offsets) in self._header(file).items():
                if name in self.files:
                    raise CheckpointError(f'tensor {name} is in both {self.files[name]} '
                                          f'and {file}')
                self.files[name], self.shapes[name], self.dtypes[name] = file, shape, dtype
                self.offsets[name] = offsets
        if weight_map is not None:
            for name, file in weight_map.items():
                if self.files.get(name) != file:
                    raise CheckpointError(f'index says tensor {name} is in {file}, '
                                          f'but {file} has no such tensor')
        self.block = quant_block_size(self.path)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _header(self, file: str) -> dict[str, tuple]:
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
            shape, dtype = tuple(info['shape']), info['dtype']
            start, end = info['data_offsets']
            if dtype not in _DTYPES:
                raise CheckpointError(f'{full}: tensor {name} has dtype {dtype}; supported: '
                                      f'{", ".join(_DTYPES)}')
            if end - start != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
                raise CheckpointError(f'{full}: tensor {name} is {end - start} bytes, but '
                                      f'{dtype} {list(shape)} needs a different size')
            if end + 8 + n > size:
                raise CheckpointError(f'{full} is truncated: tensor {name} ends past the end '
                                      'of the file')
            out[name] = (shape, dtype, (start + 8 + n, end + 8 + n))
        return out

    def nbytes(self, name: str) -> int:
        start, end = self.offsets[name]
        return end - start

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor as stored (no dequantization). Safe to call from several threads."""
        file = self.files[name]
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(os.path.join(self.path, file), os.O_RDONLY)
        out = np.empty(self.shapes[name], _DTYPES[self.dtypes[name]])
        buf, start = out.reshape(-1).view(np.uint8), self.offsets[name][0]
        done = 0
        try:
            while done < len(buf):  # a single read returns at most about 2 GB
                n = os.preadv(self._fds[file], [buf[done:]], start + done)
                if n == 0:
                    raise OSError(f'file ends after {start + done} bytes')
                done += n
        except OSError as e:
            raise CheckpointError(f'{file}: cannot read tensor {name}: {e}') from None
        return out

    def read(self, name: str) -> np.ndarray:
        """The tensor, dequantized to fp32 if it is stored quantized."""
        if self.dtypes[name] not in QUANTIZED:
            return self.read_raw(name)
        scale_name, layout = quant_scale(self, name)
        return dequantize(self.read_raw(name), self.read_raw(scale_name), layout, self.block)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def quant_block_size(path: str) -> tuple[int, int]:
    """The [out, in] block of block-wise scales, from config.json if it says."""
    try:
        with open(os.path.join(path, 'config.json')) as f:
            quant = json.load(f).get('quantization_config') or {}
    except (OSError, ValueError):
        return DEFAULT_BLOCK
    return tuple(quant.get('weight_block_size') or DEFAULT_BLOCK)


def quant_scale(ckpt: SafetensorsDir, name: str) -> tuple[str, str]:
    """The scale tensor of a quantized weight and its layout: 'channel', 'tensor' or
    'block'. Raises CheckpointError naming the weight if it has no usable scale."""
    shape = ckpt.shapes[name]
    if name + '_scale' in ckpt.shapes:
        scale = ckpt.shapes[name + '_scale']
        if scale in ((), (1,)):
            return name + '_scale', 'tensor'
        if scale == shape[:-1] + (1,):
            return name + '_scale', 'channel'
        raise CheckpointError(f'{ckpt.files[name]}: scale {name}_scale is {scale}; for '
                              f'{name} {shape} expected {shape[:-1] + (1,)} or ()')
    if name + '_scale_inv' in ckpt.shapes:
        bo, bi = ckpt.block
        expected = shape[:-2] + (-(-shape[-2] // bo), -(-shape[-1] // bi))
        scale = ckpt.shapes[name + '_scale_inv']
        if scale != expected:
            raise CheckpointError(f'{ckpt.files[name]}: scale {name}_scale_inv is {scale}; '
                                  f'{bo}x{bi} blocks of {name} {shape} need {expected}')
        return name + '_scale_inv', 'block'
    raise CheckpointError(f'{ckpt.files[name]}: tensor {name} is {ckpt.dtypes[name]} but has '
                          f'no {name}_scale or {name}_scale_inv to dequantize it with')


def dequantize(w: np.ndarray, scale: np.ndarray, layout: str,
               block: tuple[int, int] = DEFAULT_BLOCK) -> np.ndarray:
    """fp32 weight = fp32(w) * fp32(scale), the scale broadcast per channel or block."""
    scale = scale.astype(np.float32)
    if layout == 'block':
        out, inp = w.shape[-2:]
        scale = np.repeat(np.repeat(scale, block[0], axis=-2), block[1], axis=-1)
        scale = scale[..., :out, :inp]
    elif layout == 'tensor':
        scale = scale.reshape(())
    return w.astype(np.float32) * scale


def plan(cfg: GlmConfig, ckpt: SafetensorsDir, mtp: bool) -> dict[tuple, tuple]:
    """Checks every name and shape before anything is read. Returns path -> (how, what),
    the arguments of `read_param`; `source_names(how, what)` lists the tensors it reads."""
    shapes = _flatten(abstract_params(cfg, mtp=mtp))
    todo, missing, misshaped, used = {}, [], [], set()

    def check(name: str, expected: tuple[int, ...]) -> bool:
        if name not in ckpt.shapes:
            missing.append(name)
            return False
        used.add(name)
        if ckpt.shapes[name] != expected:
            misshaped.append(f'{name} (in {ckpt.files[name]}): {ckpt.shapes[name]}, '
                             f'expected {expected}')
            return False
        if ckpt.dtypes[name] in QUANTIZED:
            try:
                used.add(quant_scale(ckpt, name)[0])
            except CheckpointError as e:
                misshaped.append(str(e))
                return False
            # A static activation scale: glmjax computes in the model dtype, so unused.
            used.add(name.removesuffix('weight') + 'input_scale')
        return True

    for path, src in sources(cfg, mtp).items():
        shape = shapes[path].shape
        if src.fused and src.fused[0] in ckpt.shapes:
            fused_name, part = src.fused
            E, F, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
            check(fused_name, (E, 2 * F, D) if part != 'down' else (E, D, F))
            todo[path] = ('fused', (fused_name, part))
        elif '{e}' in src.name:
            names = [src.name.format(e=e) for e in range(cfg.n_routed_experts)]
            for name in names:
                check(name, hf_shape(src, shape))
            todo[path] = ('experts_linear' if src.n_in else 'experts', names)
        else:
            check(src.name, hf_shape(src, shape))
            todo[path] = ('linear' if src.n_in else 'same', src.name)
    ignored = set(mtp_ignored_names(cfg)) if mtp else set()
    used &= set(ckpt.shapes)
    unexpected = [f'{name} (in {ckpt.files[name]})'
                  for name in sorted(set(ckpt.shapes) - used - ignored)]
    problems = []
    for label, items in (('missing tensors', missing),
                         ('mis-shaped or unscaled tensors', misshaped),
                         ('unexpected tensors', unexpected)):
        if items:
            shown = '\n  '.join(items[:20]) + ('' if len(items) <= 20 else
                                                f'\n  ... and {len(items) - 20} more')
            problems.append(f'{len(items)} {label}:\n  {shown}')
    if problems:
        raise CheckpointError(f'checkpoint {ckpt.path} does not match the config:\n'
                              + '\n'.join(problems))
    return todo


def checkpoint_has_mtp(cfg: GlmConfig, ckpt: SafetensorsDir) -> bool:
    """transformers drops the MTP layer when it saves; such checkpoints load without it."""
    if not has_mtp(cfg):
        return False
    prefix = f'model.layers.{cfg.num_hidden_layers}.'
    found = any(name.startswith(prefix) for name in ckpt.shapes)
    if not found:
        log.warning('%s has no MTP layer (model.layers.%d.*): loading the main model '
                    'without it', ckpt.path, cfg.num_hidden_layers)
    return found


def source_names(how: str, what) -> list[str]:
    """The HF tensors (scales aside) one `plan` entry reads."""
    if how in ('experts', 'experts_linear'):
        return list(what)
    return [what[0] if how == 'fused' else what]


def read_param(ckpt: SafetensorsDir, how: str, what, shape: tuple[int, ...], dtype,
               workers: int = 1) -> np.ndarray:
    """Reads and re-lays one parameter from its HF tensor(s) into a C-contiguous `dtype`
    array. Per-expert tensors go straight into the stacked array, `workers` at a time, so
    that the peak is the stacked array plus one expert per worker."""
    if how == 'same':
        return np.ascontiguousarray(ckpt.read(what).reshape(shape), dtype=dtype)
    if how == 'linear':
        return np.ascontiguousarray(ckpt.read(what).T.reshape(shape), dtype=dtype)
    if how in ('experts', 'experts_linear'):
        out = np.empty(shape, dtype)

        def fill(e: int):
            t = ckpt.read(what[e])
            out[e] = (t.T if how == 'experts_linear' else t).reshape(shape[1:])

        if workers > 1:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                list(pool.map(fill, range(len(what))))
        else:
            for e in range(len(what)):
                fill(e)
        return out
    name, part = what
    t = ckpt.read(name)
    if part == 'down':  # [E, D, F] -> [E, F, D]
        return np.ascontiguousarray(t.transpose(0, 2, 1), dtype=dtype)
    F = t.shape[1] // 2  # gate_up [E, 2F, D], gate rows first
    return np.ascontiguousarray(t[:, :F] if part == 'gate' else t[:, F:], dtype=dtype)


def load_hf(path: str | os.PathLike, cfg: GlmConfig, dtype=jnp.bfloat16, *,
            mesh: jax.sharding.Mesh | None = None, rules=None,
            shardings: dict | None = None) -> dict:
    """Reads a Hugging Face safetensors checkpoint into the params dict.

    Every name and shape is checked before any tensor is read. The router weight and its
    correction bias stay fp32; everything else is cast to `dtype`. Placement as
    `load_checkpoint`: `mesh` (with `rules`) lays the weights out by
    `glmjax.sharding.param_shardings`; `shardings`, a tree like the params of
    `jax.sharding.Sharding`s, places them explicitly; neither: the first device. Each weight
    goes straight where it belongs.
    """
    ckpt = SafetensorsDir(path)
    mtp = checkpoint_has_mtp(cfg, ckpt)
    todo = plan(cfg, ckpt, mtp)
    abstract = _flatten(abstract_params(cfg, dtype, mtp=mtp))
    flat_shardings = _flatten(placement(cfg, mtp, mesh, rules, shardings))
    out = {}
    try:
        for path, (how, what) in todo.items():
            target = abstract[path]
            value = read_param(ckpt, how, what, target.shape, target.dtype)
            out[path] = jax.device_put(value, flat_shardings[path])
    finally:
        ckpt.close()
    return _unflatten(out)
