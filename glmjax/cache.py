"""The KV cache: an explicit pytree, passed into prefill/decode, donated and returned."""

import jax
import jax.numpy as jnp
from flax import struct

from glmjax.config import GlmConfig

# Logical axes of each cache array, mapped to the mesh by glmjax/sharding/ like the parameters.
# Heads before positions, so that attention reads each head's keys and values in place.
KV_AXES = ('batch', 'kv_heads', 'seq', 'head_dim')
LENGTHS_AXES = ('batch',)
# The paged cache's pools (glmjax/paged_attention.py): [K, P, L, H] per layer, heads first
# for the same reason.
PAGES_AXES = ('kv_heads', 'pages', 'page', 'head_dim')


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, K, S, H]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32: filled positions per row; the next token goes there

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def layers(self) -> list[tuple[jax.Array, jax.Array]]:
        return list(zip(self.k, self.v))

    def replace_layers(self, kv: list[tuple[jax.Array, jax.Array]],
                       lengths: jax.Array) -> 'KVCache':
        return KVCache(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv), lengths=lengths)


def cache_shapes(cfg: GlmConfig, batch: int, max_len: int, dtype=jnp.bfloat16,
                 num_layers: int | None = None) -> KVCache:
    """ShapeDtypeStructs of a cache; `num_layers` defaults to the main stack."""
    L = cfg.num_hidden_layers if num_layers is None else num_layers
    kv = jax.ShapeDtypeStruct((batch, cfg.num_key_value_heads, max_len, cfg.head_dim), dtype)
    return KVCache(k=(kv,) * L, v=(kv,) * L,
                   lengths=jax.ShapeDtypeStruct((batch,), jnp.int32))


def init_cache(cfg: GlmConfig, batch: int, max_len: int, dtype=jnp.bfloat16,
               num_layers: int | None = None) -> KVCache:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        cache_shapes(cfg, batch, max_len, dtype, num_layers))


def kv_bytes_per_token(cfg: GlmConfig, dtype=jnp.bfloat16) -> int:
    return (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
            * jnp.dtype(dtype).itemsize)
