"""The model's forward over a packed ragged batch and a paged KV cache: `paged_forward`.

A ragged batch is what an engine step runs: R sequences (rows), each with its next q_len
tokens (one for a decode row, a chunk for a prefill row), packed into one [T] stream of
tokens; tokens past the rows' total are padding. The conventions (kv_lens, page_indices,
cu_q_lens, num_seqs) are those of glmjax/paged_attention.py. Letters as in glmjax/layers.py,
plus P pages, L positions per page, M pages per row, R rows.

The math is the model's own: the same params tree, merged into the same modules, and each
layer's RMSNorm, projections, QK-norm, partial RoPE, MLP and MoE routing come from
glmjax/layers.py and glmjax/moe.py. Only the attention's cache handling differs: each layer
writes its new K/V into the pages (`write_kv`), then attends over them
(`ragged_paged_attention`). So the logits equal `forward` and `prefill`/`decode`.

Padding tokens change no real result: they write no page, attend to nothing, and their
routing weights are zeroed so that no expert computes them (the sorted MoE implementations
skip pairs of weight 0 entirely).
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct

from glmjax.config import GlmConfig
from glmjax.layers import Attention, apply_rope, rope_cos_sin
from glmjax.model import merge
from glmjax.moe import EXPERT_IMPLS, MoE, choose_impl, expert_shards, experts_parallel, route
from glmjax.paged_attention import pages_shape, ragged_paged_attention, token_positions, write_kv


@struct.dataclass
class KVPages:
    """The paged KV cache: an explicit pytree, passed in, donated and returned."""
    k: tuple[jax.Array, ...]  # per layer [K, P, L, H]
    v: tuple[jax.Array, ...]
    # The mesh axis the pools' kv heads are split over (None: not split), static: the Pallas
    # kernels, which the compiler cannot partition, run per device over it.
    heads_axis: str | None = struct.field(pytree_node=False, default=None)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]


def init_pages(cfg: GlmConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16,
               heads_axis: str | None = None) -> KVPages:
    """Zeroed pools for the main stack's layers."""
    shape = pages_shape(cfg, num_pages, page_size, dtype)
    layers = cfg.num_hidden_layers
    return KVPages(k=tuple(jnp.zeros(shape.shape, shape.dtype) for _ in range(layers)),
                   v=tuple(jnp.zeros(shape.shape, shape.dtype) for _ in range(layers)),
                   heads_axis=heads_axis)


def pages_bytes(cfg: GlmConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16) -> int:
    """Bytes of all layers' k and v pools."""
    shape = pages_shape(cfg, num_pages, page_size, dtype)
    return 2 * cfg.num_hidden_layers * shape.size * jnp.dtype(dtype).itemsize


def _roped(attn: Attention, x: jax.Array, positions: jax.Array, name: str) -> jax.Array:
    """The layer's queries (name 'q') or keys ('k') of packed tokens x: [T, D] at
    `positions` [T], with their bias and QK-norm, roped: [T, N or K, H]."""
    cfg = attn.cfg
    y = jnp.einsum('TD,DNH->TNH', x, getattr(attn, name)[...])
    if cfg.attention_bias:
        y = y + getattr(attn, f'{name}_bias')[...]
    if cfg.use_qk_norm:
        y = getattr(attn, f'{name}_norm')(y)
    # The rope helpers take [B, T, ...]: the packed tokens are one row of T.
    cos, sin = rope_cos_sin(cfg, positions[None], x.dtype)
    return apply_rope(y[None], cos, sin)[0]


def write_layer_kv(attn: Attention, x: jax.Array, positions: jax.Array, k_pages: jax.Array,
                   v_pages: jax.Array, batch: tuple) -> tuple[jax.Array, jax.Array]:
    """The K/V half of `_attention`: writes the keys and values of x [T, D] into one layer's
    pages [K, P, L, H] and returns them; no query, no attention."""
    v = jnp.einsum('TD,DKH->TKH', x, attn.v[...])
    if attn.cfg.attention_bias:
        v = v + attn.v_bias[...]
    return write_kv(k_pages, v_pages, _roped(attn, x, positions, 'k'), v, *batch)


def _attention(attn: Attention, x: jax.Array, positions: jax.Array, k_pages: jax.Array,
               v_pages: jax.Array, batch: tuple, impl: str | None, heads_axis: str | None,
               tokens_per_row: int = 1):
    """Attention.__call__'s math for packed tokens x: [T, D] over one layer's pages
    [K, P, L, H] (kv heads split over the mesh axis `heads_axis`). batch: (kv_lens,
    page_indices, cu_q_lens, num_seqs); tokens_per_row as in `ragged_paged_attention`.
    Returns [T, D] and the updated pages."""
    cfg = attn.cfg
    q = _roped(attn, x, positions, 'q')
    k_pages, v_pages = write_layer_kv(attn, x, positions, k_pages, v_pages, batch)
    out = ragged_paged_attention(q, k_pages, v_pages, *batch, sm_scale=cfg.head_dim ** -0.5,
                                 impl=impl, tokens_per_row=tokens_per_row,
                                 heads_axis=heads_axis)  # [T, N, H]
    T, N, H = out.shape
    return out.reshape(T, N * H) @ attn.o[...].reshape(N * H, -1), k_pages, v_pages


def _moe(moe: MoE, x: jax.Array, valid: jax.Array) -> jax.Array:
    """MoE.__call__ for x: [T, D], with the routing weights of padding tokens (valid False)
    zeroed, so that they reach no expert."""
    weights, ids = route(moe.cfg, x, moe.router[...], moe.router_bias[...])
    weights = jnp.where(valid[:, None], weights, 0.0)
    impl = choose_impl(moe.cfg, x.shape[0])
    experts = (moe.gate[...], moe.up[...], moe.down[...])
    if expert_shards() > 1:
        routed = experts_parallel(impl, x, weights, ids, *experts)
    else:
        routed = EXPERT_IMPLS[impl](x, weights, ids, *experts)
    return routed + moe.shared(x)


def paged_hidden(cfg: GlmConfig, params: dict, tokens: jax.Array, positions: jax.Array,
                 pages: KVPages, kv_lens: jax.Array, page_indices: jax.Array,
                 cu_q_lens: jax.Array, num_seqs: jax.Array, *, attn_impl: str | None = None,
                 tokens_per_row: int = 1) -> tuple[jax.Array, KVPages]:
    """The final hidden states [T, D] (after the final norm) of the packed tokens, and the
    pages with every layer's new K/V written. Arguments as in `paged_forward`;
    tokens_per_row (static) as in `ragged_paged_attention`."""
    model = merge(cfg, params)
    batch = (kv_lens, page_indices, cu_q_lens, num_seqs)
    _, _, valid = token_positions(kv_lens, cu_q_lens, num_seqs, tokens.shape[0])
    x = model.embed[...][tokens]  # [T, D]
    ks, vs = [], []
    for i, layer in enumerate(model.layers):
        h, k, v = _attention(layer.attn, layer.attn_norm(x), positions, pages.k[i], pages.v[i],
                             batch, attn_impl, pages.heads_axis, tokens_per_row)
        ks.append(k)
        vs.append(v)
        x = x + h
        h = layer.mlp_norm(x)
        x = x + (_moe(layer.mlp, h, valid) if isinstance(layer.mlp, MoE) else layer.mlp(h))
    return model.norm(x), pages.replace(k=tuple(ks), v=tuple(vs))


@functools.partial(jax.jit, static_argnums=0, static_argnames='attn_impl',
                   donate_argnames='pages')
def paged_forward(cfg: GlmConfig, params: dict, tokens: jax.Array, positions: jax.Array,
                  pages: KVPages, kv_lens: jax.Array, page_indices: jax.Array,
                  cu_q_lens: jax.Array, num_seqs: jax.Array, *,
                  attn_impl: str | None = None) -> tuple[jax.Array, KVPages]:
    """One step of a ragged batch: writes its tokens' K/V into the pages and returns the
    fp32 logits after each row's last new token, [R, V], and the pages (donated).

    tokens, positions: [T] int32 (positions: each token's place in its sequence, as
    `token_positions` gives it); pages: per layer [K, P, L, H]; kv_lens: [R] int32, each
    row's length including its new tokens; page_indices: [R, M] int32; cu_q_lens: [R + 1]
    int32; num_seqs: [1] int32 live rows. Rows past num_seqs give garbage logits.
    `attn_impl` (static): one of paged_attention.IMPLS, chosen per backend when None.
    """
    h, pages = paged_hidden(cfg, params, tokens, positions, pages, kv_lens, page_indices,
                            cu_q_lens, num_seqs, attn_impl=attn_impl)
    last = jnp.clip(cu_q_lens[1:] - 1, 0, tokens.shape[0] - 1)  # [R]
    return merge(cfg, params).logits(h[last]), pages
