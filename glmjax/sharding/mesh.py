"""Building the device mesh: always the three axes of `axes.MESH_AXES`, size 1 when unused.

The axes are Auto, on purpose: parameters and the KV cache carry NamedShardings and the
compiler propagates them through attention and the dense FFNs; the one manual region is the
MoE expert dispatch (a shard_map over `expert`). Explicit axes would make every contraction
over a sharded dimension in the model code name its output sharding.
"""

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from glmjax.mesh_axes import MESH_AXES


class MeshError(ValueError):
    """A mesh that cannot be built; the message says what to change."""


def format_mesh(axis_sizes: Mapping[str, int]) -> str:
    return ','.join(f'{a}={n}' for a, n in axis_sizes.items())


def parse_mesh(spec: str) -> dict[str, int]:
    """'expert=4,tensor=2' -> {'expert': 4, 'tensor': 2}."""
    sizes = {}
    for part in spec.split(','):
        name, eq, size = part.strip().partition('=')
        if not eq or not size.strip().isdigit():
            raise MeshError(f'mesh {spec!r}: write each axis as name=size, e.g. expert=4,tensor=2')
        if name.strip() in sizes:
            raise MeshError(f'mesh {spec!r}: axis {name.strip()!r} is given twice')
        sizes[name.strip()] = int(size)
    return sizes


def check_axis_sizes(axis_sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The full shape over MESH_AXES (absent axes are 1), or a MeshError."""
    unknown = [a for a in axis_sizes if a not in MESH_AXES]
    if unknown:
        raise MeshError(f'unknown mesh axis {unknown[0]!r}; the mesh axes are '
                        f'{", ".join(MESH_AXES)}')
    bad = {a: n for a, n in axis_sizes.items() if not isinstance(n, int) or n < 1}
    if bad:
        raise MeshError(f'mesh axis sizes must be integers >= 1, got {format_mesh(bad)}')
    return tuple(axis_sizes.get(a, 1) for a in MESH_AXES)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
    """A mesh with axes (data, expert, tensor); e.g. make_mesh({'expert': 4, 'tensor': 2}).

    `devices` defaults to all devices of all processes; the sizes must multiply to their
    number exactly (a mesh that leaves devices idle is almost always a typo).
    """
    shape = check_axis_sizes(axis_sizes)
    devices = jax.devices() if devices is None else list(devices)
    if math.prod(shape) != len(devices):
        raise MeshError(
            f'mesh {format_mesh(axis_sizes)} needs {math.prod(shape)} devices but there are '
            f'{len(devices)}: choose sizes whose product is {len(devices)} '
            f'(e.g. expert={len(devices)})')
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
