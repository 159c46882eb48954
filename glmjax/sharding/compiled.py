"""Per-device memory of compiled programs, and full-depth sizes from compiles of a few layers.

Compiling all of GLM-4.6's 92 layers takes minutes, and the layers past the dense ones are
identical in shape, code and sharding: a size X at depth L is X(a + 2) + (L - a - 2) d, from
the compiles at a = first_k_dense_replace + 1, a + 1 and a + 2 layers, d the larger of the
two steps between them. One step is not enough: XLA's buffer reuse can make the second MoE
layer add less than each one after it (seen on the tiny model: +0.24 MB, then +1.18 MB a
layer), and a size extrapolated from it falls short.
"""

import dataclasses
from collections.abc import Callable

from glmjax.config import GlmConfig


def memory_sizes(lowered) -> dict:
    """Per-device bytes of a lowered program's compile: arguments, temporaries, and outputs
    that are not donated arguments' buffers."""
    memory = lowered.compile().memory_analysis()
    return {'arguments': memory.argument_size_in_bytes, 'temp': memory.temp_size_in_bytes,
            'outputs': memory.output_size_in_bytes - memory.alias_size_in_bytes}


def truncated(cfg: GlmConfig, num_layers: int, tree: dict) -> tuple[GlmConfig, dict]:
    """The config with fewer layers, and a params-like tree to match (its other parts, the
    MTP layer's, kept)."""
    model = {**tree['model'], 'layers': {i: tree['model']['layers'][i]
                                         for i in range(num_layers)}}
    return dataclasses.replace(cfg, num_hidden_layers=num_layers), {**tree, 'model': model}


def full_depth(cfg: GlmConfig, sizes_at: Callable[[int], dict[str, int]]
               ) -> tuple[dict[str, int], dict[str, int], list[int]]:
    """sizes_at(n), the sizes of a compile of n layers (`truncated`), extrapolated to cfg's
    depth (the module docstring); the sizes of the smallest compile; the layer counts
    compiled. A size that shrinks with depth (XLA's rounding) is taken as constant."""
    L, k = cfg.num_hidden_layers, cfg.first_k_dense_replace
    counts = [L] if L <= k + 3 else [k + 1, k + 2, k + 3]
    sizes = [sizes_at(n) for n in counts]
    if len(sizes) == 1:
        return sizes[0], sizes[0], counts
    a, b, c = sizes
    full = {key: c[key] + (L - counts[-1]) * max(0, b[key] - a[key], c[key] - b[key])
            for key in a}
    return full, a, counts
