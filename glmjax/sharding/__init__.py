"""Sharding glmjax over a device mesh: mesh axes, the logical-axis rules, multi-host start-up
and (in `sharding.plan`, the `glmjax-plan` command) a memory planner.

Mesh axes (`sharding.axes`): `data` (batch rows), `expert` (routed experts; the MoE layers
run expert-parallel over it with a shard_map and a psum), `tensor` (attention heads, FFN
width, vocabulary; annotated only, the compiler partitions). The axes are Auto.

Running sharded:

    import jax, jax.numpy as jnp
    import glmjax, sharding

    mesh = sharding.make_mesh({'expert': 4, 'tensor': 2})   # sizes multiply to the devices
    params = glmjax.load_hf(path, cfg, jnp.bfloat16,
                            shardings=sharding.param_shardings(cfg, mesh))
    shapes = glmjax.cache_shapes(cfg, batch, max_len)
    cache = jax.device_put(glmjax.init_cache(cfg, batch, max_len),
                           sharding.cache_shardings(cfg, mesh, shapes))
    with jax.set_mesh(mesh):  # the MoE layers find the expert axis here
        logits, cache = glmjax.prefill(cfg, params, tokens, lengths, cache)
        logits, cache = glmjax.decode(cfg, params, next_tokens, cache)

Every call that should run expert-parallel must be inside `jax.set_mesh(mesh)`: the jitted
functions key their compilation on the mesh in context, and without one the MoE layers run
unsharded (correct, but every expert weight is gathered to every device). Multi-host: call
`sharding.distributed.initialize()` first in every process, then do the same as above; the
mesh spans the devices of all processes.
"""

from glmjax.mesh_axes import DATA, EXPERT, MESH_AXES, TENSOR
from glmjax.sharding.mesh import MeshError, make_mesh, parse_mesh
from glmjax.sharding.rules import (
    LOGICAL_AXES,
    PRESETS,
    Rules,
    RulesError,
    cache_shardings,
    pages_shardings,
    param_shardings,
    partition_spec,
    with_shardings,
)

__all__ = [
    'DATA', 'EXPERT', 'LOGICAL_AXES', 'MESH_AXES', 'PRESETS', 'TENSOR', 'MeshError', 'Rules',
    'RulesError', 'cache_shardings', 'make_mesh', 'pages_shardings', 'param_shardings',
    'parse_mesh', 'partition_spec', 'with_shardings',
]
