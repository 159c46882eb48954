"""Logical axes -> mesh axes: one typed table (`Rules`), its presets, and the shardings of
the parameters and the KV cache derived from it.

Each parameter declares its logical axes where it is defined (glmjax/layers.py, moe.py);
the cache's are `glmjax.cache.KV_AXES`. A `Rules` has one field per logical axis, so a rule
cannot be given twice, and a name it lacks is an error, never a silent default.

What happens when a dimension does not divide over its mesh axis is decided here, once:
- KV heads (8 in GLM-4.x) split over `tensor` up to 8 ways; beyond that (or whenever the
  count does not divide) they are replicated on every tensor shard, with a logged warning.
- Any other dimension: an error that names the array, the sizes, and what to change.
"""

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax.cache import KV_AXES, LENGTHS_AXES, PAGES_AXES, KVCache
from glmjax.config import GlmConfig
from glmjax.mesh_axes import DATA, EXPERT, MESH_AXES, TENSOR
from glmjax.model import abstract_params, has_mtp, param_axes

log = logging.getLogger(__name__)


class RulesError(ValueError):
    """Rules that cannot shard an array on a mesh; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """Mesh axis (or None: replicated) for each logical axis."""
    batch: str | None = DATA
    seq: str | None = None
    vocab: str | None = TENSOR
    embed: str | None = None
    q_heads: str | None = TENSOR
    kv_heads: str | None = TENSOR
    head_dim: str | None = None
    mlp: str | None = TENSOR
    experts: str | None = EXPERT
    moe_mlp: str | None = TENSOR
    pages: str | None = None  # the paged KV cache's page pool
    page: str | None = None  # positions within a page

    def __post_init__(self):
        for logical, mesh_axis in dataclasses.asdict(self).items():
            if mesh_axis is not None and mesh_axis not in MESH_AXES:
                raise RulesError(f'Rules.{logical} = {mesh_axis!r} is not a mesh axis; use one '
                                 f'of {", ".join(MESH_AXES)} or None (replicated)')
        if self.experts not in (EXPERT, None):
            raise RulesError(f'Rules.experts = {self.experts!r}: the MoE layers split experts '
                             f"only over the {EXPERT!r} mesh axis; use {EXPERT!r} or None")

    @classmethod
    def preset(cls, name: str, **overrides: str | None) -> 'Rules':
        """A named preset (see PRESETS), optionally with some logical axes remapped."""
        if name not in PRESETS:
            raise RulesError(f'unknown rules preset {name!r}; known: {", ".join(PRESETS)}')
        unknown = [k for k in overrides if k not in LOGICAL_AXES]
        if unknown:
            raise RulesError(f'unknown logical axis {unknown[0]!r}; the logical axes are '
                             f'{", ".join(LOGICAL_AXES)}')
        return dataclasses.replace(PRESETS[name], **overrides)


LOGICAL_AXES = tuple(f.name for f in dataclasses.fields(Rules))

PRESETS: dict[str, Rules] = {
    # Serving: experts over `expert`, each expert's width, the attention heads, the dense
    # FFN and the vocabulary over `tensor`, batch rows over `data`. No large weight is held
    # twice unless an axis is left to replicas (e.g. attention across `expert`).
    'decode_ep': Rules(),
    # Experts over `expert`, and everything else split over the same devices too: the
    # attention heads (so the KV pages), the dense FFNs and shared experts and the vocabulary
    # (tensor parallelism within the expert group, vLLM's layout with expert parallelism);
    # each expert's width over `tensor`. On an expert-only mesh no weight and no KV page is
    # held twice: GLM-4.6 on 8 devices keeps 1/8 of the attention and KV per device, where
    # decode_ep holds all of it on each.
    'ep_tp': Rules(vocab=EXPERT, q_heads=EXPERT, kv_heads=EXPERT, mlp=EXPERT),
    # Pure tensor parallelism (Megatron layout) for meshes without an expert axis: every
    # expert split along its width over `tensor`.
    'prefill_tp': Rules(experts=None),
    # Data parallelism only: every device holds the whole model.
    'replicated': Rules(vocab=None, q_heads=None, kv_heads=None, mlp=None, experts=None,
                        moe_mlp=None),
}
DEFAULT_RULES = 'decode_ep'


def get_rules(rules: Rules | str | None) -> Rules:
    if rules is None:
        return PRESETS[DEFAULT_RULES]
    return Rules.preset(rules) if isinstance(rules, str) else rules


def partition_spec(rules: Rules, mesh: Mesh, axes: tuple[str | None, ...],
                   shape: tuple[int, ...], what: str) -> tuple[PartitionSpec, str | None]:
    """The PartitionSpec of one array, and a warning when KV heads had to be replicated.

    Mesh axes of size 1 (or absent from `mesh`) are left out of the spec: the same layout.
    """
    if len(axes) != len(shape):
        raise RulesError(f'{what}: {len(axes)} logical axes {axes} for shape {shape}')
    spec, used, warning = [], {}, None
    for dim, (logical, n) in enumerate(zip(axes, shape)):
        if logical is not None and logical not in LOGICAL_AXES:
            raise RulesError(f'{what}: logical axis {logical!r} has no rule; add a field to '
                             f'sharding.Rules (known: {", ".join(LOGICAL_AXES)})')
        mesh_axis = None if logical is None else getattr(rules, logical)
        if mesh_axis is None:
            spec.append(None)
            continue
        if mesh_axis in used:
            raise RulesError(
                f'{what}: logical axes {used[mesh_axis]!r} and {logical!r} both map to mesh '
                f'axis {mesh_axis!r}, and one array cannot be split twice over the same mesh '
                f'axis; set Rules.{logical} (or Rules.{used[mesh_axis]}) to another axis or None')
        used[mesh_axis] = logical
        size = mesh.shape.get(mesh_axis, 1)
        if n % size == 0:
            spec.append(mesh_axis if size > 1 else None)
        elif logical == 'kv_heads':
            warning = (f'{n} KV heads do not split over mesh axis {mesh_axis}={size}: KV heads '
                       f'(the k/v projections and the KV cache) are replicated on every '
                       f'{mesh_axis} shard, so each device holds all of them; a {mesh_axis} size '
                       f'that divides {n} would split them')
            spec.append(None)
        else:
            # Experts cannot be replicated while the mesh has an expert axis > 1.
            other = '' if logical == 'experts' else f', or set Rules.{logical}=None'
            raise RulesError(
                f'{what}: dimension {dim} ({logical!r}, size {n}) does not divide over mesh '
                f'axis {mesh_axis!r} of size {size}; give mesh axis {mesh_axis!r} a size that '
                f'divides {n}{other}')
    return PartitionSpec(*spec), warning


def check_rules_for_mesh(rules: Rules, mesh: Mesh) -> None:
    """The MoE layers run expert-parallel whenever the mesh has an expert axis > 1."""
    if rules.experts is None and mesh.shape.get(EXPERT, 1) > 1:
        raise RulesError(f'the rules leave experts unsharded but the mesh has {EXPERT}='
                         f'{mesh.shape[EXPERT]}, over which the MoE layers always split the '
                         f'experts; use Rules.experts={EXPERT!r} (preset {DEFAULT_RULES!r}) '
                         f'or a mesh without an {EXPERT} axis')


def _path(keys) -> str:
    return jax.tree_util.keystr(keys, simple=True, separator='/')


def _is_axes(x) -> bool:
    return isinstance(x, tuple)


def param_shardings(cfg: GlmConfig, mesh: Mesh, rules: Rules | str | None = None,
                    mtp: bool | None = None) -> dict:
    """A tree like the params (`{'model': ..., 'mtp': ...}`) of NamedShardings.

    `rules`: a Rules, a preset name, or None for 'decode_ep'. `mtp`: include the MTP layer
    (default: when the config has one).
    """
    rules = get_rules(rules)
    check_rules_for_mesh(rules, mesh)
    mtp = has_mtp(cfg) if mtp is None else mtp
    warnings = set()

    def one(keys, axes, shape):
        spec, warning = partition_spec(rules, mesh, axes, shape.shape,
                                       f'parameter {_path(keys)}')
        warnings.add(warning)
        return NamedSharding(mesh, spec)

    out = jax.tree_util.tree_map_with_path(one, param_axes(cfg, mtp), abstract_params(cfg, mtp=mtp),
                                           is_leaf=_is_axes)
    for warning in sorted(w for w in warnings if w):
        log.warning(warning)
    return out


def placement(cfg: GlmConfig, mtp: bool, mesh: Mesh | None = None,
              rules: Rules | str | None = None, shardings: dict | None = None) -> dict:
    """Where each weight goes, for the loaders (`load_hf`, `load_checkpoint`): `shardings`
    as given (a tree like the params), else `param_shardings(cfg, mesh, rules)`, else the
    first device."""
    if shardings is not None:
        if mesh is not None or rules is not None:
            raise ValueError('give shardings= or mesh= (with rules=), not both')
        return shardings
    if mesh is not None:
        return param_shardings(cfg, mesh, rules, mtp=mtp)
    if rules is not None:
        raise ValueError('rules= needs a mesh=')
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract_params(cfg, mtp=mtp))


def cache_shardings(cfg: GlmConfig, mesh: Mesh, cache_shape_tree: KVCache,
                    rules: Rules | str | None = None) -> KVCache:
    """A KVCache of NamedShardings for a cache of these shapes (arrays or ShapeDtypeStructs,
    e.g. `glmjax.cache_shapes(cfg, batch, max_len)`)."""
    rules = get_rules(rules)
    K, H = cfg.num_key_value_heads, cfg.head_dim
    warnings = set()

    def one(array, axes, what):
        if axes == KV_AXES and (array.shape[1], array.shape[3]) != (K, H):
            raise RulesError(f'{what} has shape {array.shape}; the config wants [B, {K}, S, {H}]')
        spec, warning = partition_spec(rules, mesh, axes, array.shape, what)
        warnings.add(warning)
        return NamedSharding(mesh, spec)

    c = cache_shape_tree
    out = KVCache(k=tuple(one(a, KV_AXES, f'cache k[{i}]') for i, a in enumerate(c.k)),
                  v=tuple(one(a, KV_AXES, f'cache v[{i}]') for i, a in enumerate(c.v)),
                  lengths=one(c.lengths, LENGTHS_AXES, 'cache lengths'))
    for warning in sorted(w for w in warnings if w):
        log.warning(warning)
    return out


def pages_shardings(cfg: GlmConfig, mesh: Mesh, pages, rules: Rules | str | None = None):
    """NamedShardings, in the same tree, for a paged KV cache (glmjax/paged_inference.py's
    KVPages: per layer [K, P, L, H] pools, laid out by PAGES_AXES: heads split as the
    contiguous cache's)."""
    rules = get_rules(rules)
    warnings = set()

    def one(array):
        spec, warning = partition_spec(rules, mesh, PAGES_AXES, array.shape, 'KV pages')
        warnings.add(warning)
        return NamedSharding(mesh, spec)

    out = jax.tree.map(one, pages)
    for warning in sorted(w for w in warnings if w):
        log.warning(warning)
    return out


def bytes_per_device(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(s.sharding.shard_shape(s.shape)) * jnp.dtype(s.dtype).itemsize
               for s in jax.tree.leaves(tree))


def with_shardings(shapes, shardings):
    """ShapeDtypeStructs carrying shardings, for lowering against abstract inputs."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
