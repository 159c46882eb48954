"""The GLM-4.x MoE transformer as Flax NNX modules, and its parameter tree.

Parameters travel as a plain nested dict, `{'model': {...}, 'mtp': {...}}`: 'model' is the
decoder stack with embedding and lm_head; 'mtp' is the optional multi-token-prediction layer
(the Hugging Face layer index num_hidden_layers), absent when a checkpoint has none. Modules
are rebuilt from the config inside jitted functions with `nnx.merge`.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.config import GlmConfig
from glmjax.layers import MLP, Attention, RMSNorm, param
from glmjax.moe import MoE


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: GlmConfig, index: int, dtype, rngs: nnx.Rngs | None):
        D = cfg.hidden_size
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps, 'embed', dtype, rngs)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = RMSNorm(D, cfg.rms_norm_eps, 'embed', dtype, rngs)
        self.mlp = (MoE(cfg, dtype, rngs) if cfg.is_moe_layer(index)
                    else MLP(cfg, cfg.intermediate_size, 'mlp', dtype, rngs))

    def __call__(self, x, positions, kv=None, kv_len=None):
        h, kv = self.attn(self.attn_norm(x), positions, kv, kv_len)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


class Glm(nnx.Module):
    def __init__(self, cfg: GlmConfig, dtype, rngs: nnx.Rngs | None):
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = param(rngs, (V, D), ('vocab', 'embed'), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, 'embed', dtype, rngs)
        self.lm_head = param(rngs, (D, V), ('embed', 'vocab'), dtype)

    def __call__(self, tokens, positions, kv=None, kv_len=None):
        """tokens, positions: [B, T]; kv: per-layer (k, v) or None; kv_len: see Attention.
        Returns the final hidden states [B, T, D] (after the final norm) and the new kv."""
        x = self.embed[...][tokens]
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, layer_kv = layer(x, positions, None if kv is None else kv[i], kv_len)
            new_kv.append(layer_kv)
        return self.norm(x), (None if kv is None else new_kv)

    def logits(self, h: jax.Array) -> jax.Array:
        """[..., D] -> fp32 [..., V]."""
        return (h @ self.lm_head[...]).astype(jnp.float32)


class Mtp(nnx.Module):
    """Multi-token prediction: from the main model's final hidden state at position p and
    the token at p+1, predict the token at p+2. Reuses the main embedding and lm_head."""

    def __init__(self, cfg: GlmConfig, dtype, rngs: nnx.Rngs | None):
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, 'embed', dtype, rngs)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, 'embed', dtype, rngs)
        self.eh_proj = param(rngs, (2 * D, D), (None, 'embed'), dtype)
        self.layer = DecoderLayer(cfg, cfg.num_hidden_layers, dtype, rngs)
        self.head_norm = RMSNorm(D, cfg.rms_norm_eps, 'embed', dtype, rngs)

    def __call__(self, main: Glm, hidden, next_tokens, positions, kv=None):
        """hidden: [B, T, D] main final hidden; next_tokens, positions: [B, T]."""
        e = self.enorm(main.embed[...][next_tokens])
        x = jnp.concatenate([e, self.hnorm(hidden)], axis=-1) @ self.eh_proj[...]
        x, kv = self.layer(x, positions, kv)
        return main.logits(self.head_norm(x)), kv


def _build(cfg: GlmConfig, dtype, seed: int | None, mtp: bool) -> dict[str, nnx.Module]:
    """The modules; with seed None their parameters are abstract."""
    rngs = None if seed is None else nnx.Rngs(seed)
    modules = {'model': Glm(cfg, dtype, rngs)}
    if mtp:
        modules['mtp'] = Mtp(cfg, dtype, rngs)
    return modules


@functools.lru_cache(maxsize=64)
def _abstract(cfg: GlmConfig, dtype, mtp: bool):
    modules = _build(cfg, dtype, None, mtp)
    return {name: nnx.split(m) for name, m in modules.items()}


def graphdef(cfg: GlmConfig, part: str = 'model'):
    return _abstract(cfg, jnp.float32, True)[part][0]


def merge(cfg: GlmConfig, params: dict, part: str = 'model'):
    return nnx.merge(graphdef(cfg, part), params[part])


def has_mtp(cfg: GlmConfig) -> bool:
    return cfg.num_nextn_predict_layers > 0


def abstract_params(cfg: GlmConfig, dtype=jnp.bfloat16, mtp: bool | None = None) -> dict:
    """The parameter tree as ShapeDtypeStructs; nothing is allocated."""
    mtp = has_mtp(cfg) if mtp is None else mtp
    return {name: nnx.to_pure_dict(state) for name, (_, state) in
            _abstract(cfg, dtype, mtp).items()}


def param_axes(cfg: GlmConfig, mtp: bool | None = None) -> dict:
    """The same tree with each leaf's logical axes, e.g. ('experts', 'moe_mlp', 'embed')."""
    mtp = has_mtp(cfg) if mtp is None else mtp
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return {name: nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()['axes'], state,
                                                is_leaf=is_var))
            for name, (_, state) in _abstract(cfg, jnp.float32, mtp).items()}


def init_params(cfg: GlmConfig, dtype=jnp.float32, seed: int = 0,
                mtp: bool | None = None) -> dict:
    """Random weights (for tests, demos and benchmarks)."""
    mtp = has_mtp(cfg) if mtp is None else mtp
    modules = _build(cfg, dtype, seed, mtp)
    return {name: nnx.to_pure_dict(nnx.state(m)) for name, m in modules.items()}
