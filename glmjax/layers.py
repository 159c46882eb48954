"""Building blocks: RMSNorm, partial NeoX RoPE, GQA attention with QK-norm, the SwiGLU MLP.

Dimension letters, used in every einsum and shape comment:
B batch, T new tokens, S cache length, D model width, F ffn width, N query heads,
K kv heads, G query heads per kv head, H head dim, E experts, V vocab.

Every parameter names its logical axes (`axes=`) where it is declared; `glmjax/sharding/` maps
those names to mesh axes, and the checkpoint loaders check against the same declarations.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.config import GlmConfig

INIT_STD = 0.02


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          init: str = 'normal', std: float = INIT_STD) -> nnx.Param:
    """A parameter with its logical axes. With rngs None it is abstract (a ShapeDtypeStruct):
    building a 355B-parameter tree that way costs nothing."""
    assert len(shape) == len(axes), (shape, axes)
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, dtype), axes=axes)
    if init == 'normal':
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = jnp.full(shape, {'ones': 1.0, 'zeros': 0.0}[init], jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis: str | None, dtype, rngs: nnx.Rngs | None):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis,), dtype, init='ones')

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in fp32, cast back, then scale: the order transformers uses.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def rope_cos_sin(cfg: GlmConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin for the rotated slice of each head: [B, T, rotary_dim]."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """NeoX-style rotation of the first rotary_dim dims of each head; the rest pass through.

    x: [B, T, heads, H]; cos, sin: [B, T, rotary_dim].
    """
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    rot = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([rot, rest], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: GlmConfig, dtype, rngs: nnx.Rngs | None):
        self.cfg = cfg
        D, N, K, H = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_dim)
        self.q = param(rngs, (D, N, H), ('embed', 'q_heads', 'head_dim'), dtype)
        self.k = param(rngs, (D, K, H), ('embed', 'kv_heads', 'head_dim'), dtype)
        self.v = param(rngs, (D, K, H), ('embed', 'kv_heads', 'head_dim'), dtype)
        self.o = param(rngs, (N, H, D), ('q_heads', 'head_dim', 'embed'), dtype)
        if cfg.attention_bias:
            self.q_bias = param(rngs, (N, H), ('q_heads', 'head_dim'), dtype, init='zeros')
            self.k_bias = param(rngs, (K, H), ('kv_heads', 'head_dim'), dtype, init='zeros')
            self.v_bias = param(rngs, (K, H), ('kv_heads', 'head_dim'), dtype, init='zeros')
        if cfg.use_qk_norm:
            # One [H] weight shared by all heads.
            self.q_norm = RMSNorm(H, cfg.rms_norm_eps, 'head_dim', dtype, rngs)
            self.k_norm = RMSNorm(H, cfg.rms_norm_eps, 'head_dim', dtype, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, kv_len: int | None = None):
        """x: [B, T, D]; positions: [B, T] absolute positions of the new tokens.

        Without `kv` the keys are the T new tokens (a full causal forward). With `kv`
        ([B, K, S, H] each) the new keys are written at their positions and the queries
        attend over the cache; a key is visible when its position is <= the query's.
        `kv_len` (static) bounds every row's length after this call: attention then reads
        only the first kv_len cache positions instead of all S.
        Returns the output [B, T, D] and the updated kv (or None).
        """
        cfg = self.cfg
        q = jnp.einsum('BTD,DNH->BTNH', x, self.q[...])
        k = jnp.einsum('BTD,DKH->BTKH', x, self.k[...])
        v = jnp.einsum('BTD,DKH->BTKH', x, self.v[...])
        if cfg.attention_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if cfg.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(cfg, positions, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if kv is None:
            key_positions = positions  # [B, S=T]
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
        else:
            rows = jnp.arange(x.shape[0])[:, None]
            # [B, T, K, H] values land at [row, :, position]. Positions past the cache end
            # are dropped: only padding ever lands there.
            k = kv[0].at[rows, :, positions].set(k.astype(kv[0].dtype), mode='drop')
            v = kv[1].at[rows, :, positions].set(v.astype(kv[1].dtype), mode='drop')
            kv = (k, v)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            key_positions = jnp.broadcast_to(jnp.arange(k.shape[2]), (x.shape[0], k.shape[2]))
        visible = key_positions[:, None, :] <= positions[:, :, None]  # [B, T, S]
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), visible, cfg.head_dim ** -0.5)
        # As one [N*H, D] matmul: an einsum over (N, H) had XLA:CPU transpose the whole
        # weight to match the attention output's layout, every step.
        B, T, N, H = out.shape
        return out.reshape(B, T, N * H) @ self.o[...].reshape(N * H, -1), kv


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
           scale: float) -> jax.Array:
    """Grouped-query attention. q: [B, T, N, H]; k, v: [B, K, S, H]; visible: [B, T, S]."""
    B, T, N, H = q.shape
    K = k.shape[1]
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum('BTKGH,BKSH->BKGTS', q, k) * scale
    scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum('BKGTS,BKSH->BTKGH', probs, v)
    return out.reshape(B, T, N, H)


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases: the dense FFN and the shared expert."""

    def __init__(self, cfg: GlmConfig, width: int, axis: str, dtype, rngs: nnx.Rngs | None):
        D = cfg.hidden_size
        self.gate = param(rngs, (D, width), ('embed', axis), dtype)
        self.up = param(rngs, (D, width), ('embed', axis), dtype)
        self.down = param(rngs, (width, D), (axis, 'embed'), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(x @ self.gate[...]) * (x @ self.up[...])
        return h @ self.down[...]
