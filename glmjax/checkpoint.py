"""glmjax checkpoints on disk: the layout `glmjax-convert` writes, and `load_checkpoint`.

A checkpoint directory holds:
  config.json, tokenizer and template files   copied from the Hugging Face checkpoint
  params/<item>/                              one Orbax (OCDBT) checkpoint per item: 'model'
                                              (embed, final norm, lm_head), 'layer_000' ...
                                              (one decoder layer each), 'mtp' (if present)
  params/<item>/glmjax_item.json              each array's shape, dtype and crc32
  glmjax_convert.json                         the conversion's settings (for --resume)
  COMPLETE                                    the manifest, written last: present only
                                              when every item is written and verified
One item per layer bounds the converter's memory by about one layer and lets a restarted
conversion skip what is done. Items have string keys only (Orbax wants strings): a layer
item is the layer's own subtree, and the int layer index lives in the item's name.
"""

import hashlib
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from glmjax.config import GlmConfig
from glmjax.hf import CheckpointError, _flatten, _unflatten
from glmjax.model import abstract_params
from glmjax.sharding.rules import placement

FORMAT = 'glmjax-orbax-v1'
COMPLETE = 'COMPLETE'
SETTINGS = 'glmjax_convert.json'
PARAMS = 'params'
ITEM_RECORD = 'glmjax_item.json'


def item_of(path: tuple) -> tuple[str, tuple]:
    """Parameter path -> (item name, path inside the item)."""
    if path[0] == 'mtp':
        return 'mtp', path[1:]
    if path[1] == 'layers':
        return f'layer_{path[2]:03d}', path[3:]
    return 'model', path[1:]


def param_path(item: str, sub: tuple) -> tuple:
    """The inverse of `item_of`."""
    if item == 'mtp':
        return ('mtp',) + sub
    if item.startswith('layer_'):
        return ('model', 'layers', int(item[len('layer_'):])) + sub
    return ('model',) + sub


def array_key(sub: tuple) -> str:
    """How an array is named in the records: 'attn.q_norm.weight'."""
    return '.'.join(sub)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own digest, keys sorted."""
    body = {k: v for k, v in manifest.items() if k != 'sha256'}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(path: str | os.PathLike) -> dict:
    """The COMPLETE manifest; refuses a directory whose conversion did not finish."""
    path = os.fspath(path)
    marker = os.path.join(path, COMPLETE)
    if not os.path.exists(marker):
        if os.path.exists(os.path.join(path, SETTINGS)):
            raise CheckpointError(f'{path} is an unfinished conversion (no {COMPLETE} marker): '
                                  'rerun glmjax-convert with --resume to finish it')
        raise CheckpointError(f'{path} is not a glmjax checkpoint (no {COMPLETE} marker)')
    try:
        with open(marker) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{marker} is unreadable: {e}') from None
    if manifest.get('format') != FORMAT:
        raise CheckpointError(f'{marker}: format {manifest.get("format")!r}, expected {FORMAT!r}')
    if manifest.get('sha256') != manifest_digest(manifest):
        raise CheckpointError(f'{marker} does not match its own sha256: the file is damaged')
    return manifest


def _check_manifest(path: str, manifest: dict, abstract: dict) -> None:
    """Every array the config declares is in the manifest with its shape, and no other."""
    recorded = {param_path(item, tuple(key.split('.'))): info
                for item, arrays in manifest['items'].items() for key, info in arrays.items()}
    problems = [f'missing {p}' for p in abstract if p not in recorded]
    problems += [f'unexpected {p}' for p in recorded if p not in abstract]
    problems += [f'{p}: {tuple(recorded[p]["shape"])} {recorded[p]["dtype"]}, expected '
                 f'{a.shape} {a.dtype}' for p, a in abstract.items()
                 if p in recorded and (tuple(recorded[p]['shape']) != a.shape
                                       or recorded[p]['dtype'] != str(a.dtype))]
    if problems:
        raise CheckpointError(f'{path} does not match its config.json:\n  '
                              + '\n  '.join(problems[:20]))


def load_checkpoint(path: str | os.PathLike, *, dtype=None,
                    mesh: jax.sharding.Mesh | None = None, rules=None,
                    shardings: dict | None = None,
                    progress=None) -> tuple[GlmConfig, dict]:
    """Restores a checkpoint written by glmjax-convert: returns (cfg, params).

    Each array is read straight into its target sharding (Orbax restore with
    ShapeDtypeStruct targets), so each host reads only its shards; no host holds the whole
    model. Placement as `load_hf`: `mesh` (with `rules`, a preset name or Rules) lays the
    weights out by `glmjax.sharding.param_shardings`; `shardings`, a tree like the params,
    places them explicitly; neither: the first device. `dtype`: cast on restore (the router
    stays fp32); default the stored dtype. `progress(done, total)` is called after each
    restored item (the embeddings and each layer).
    """
    path = os.path.abspath(path)  # Orbax wants absolute paths
    manifest = read_manifest(path)
    cfg = GlmConfig.from_hf(path)
    mtp = manifest['mtp'] is not None
    stored = _flatten(abstract_params(cfg, jnp.dtype(manifest['dtype']), mtp=mtp))
    _check_manifest(path, manifest, stored)
    targets = _flatten(abstract_params(cfg, dtype or jnp.dtype(manifest['dtype']), mtp=mtp))
    placed = _flatten(placement(cfg, mtp, mesh, rules, shardings))
    by_item: dict[str, dict] = {}
    for p, a in targets.items():
        item, sub = item_of(p)
        by_item.setdefault(item, {})[sub] = jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                 sharding=placed[p])
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    out = {}
    for i, (item, subs) in enumerate(by_item.items()):
        target = _unflatten(subs)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = checkpointer.restore(
            os.path.join(path, PARAMS, item),
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
        out.update({param_path(item, sub): v for sub, v in _flatten(restored).items()})
        if progress is not None:
            progress(i + 1, len(by_item))
    return cfg, _unflatten(out)


def crc32(a: np.ndarray) -> int:
    """Checksum of an array's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
