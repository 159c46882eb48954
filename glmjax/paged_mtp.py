"""The MTP layer over a packed ragged batch and KV pages of its own: `paged_mtp_hidden`.

The multi-token-prediction layer (glmjax.model.Mtp) reads a pair per position: MTP position
p holds (h_p, x_{p+1}), the main model's final hidden state at p and the token after it, and
its output predicts x_{p+2}. Its RoPE position is p, as in `inference.mtp_forward`. So the MTP
layer's cache is indexed by the main model's positions: one more pool (`KVPages` of one
layer) beside the main stack's, under the same page tables, with the conventions of
glmjax/paged_attention.py (kv_lens, page_indices, cu_q_lens, num_seqs). A row's MTP length is
one less than its main length until its next token is known (the pair needs it).

The math is the Mtp module's own, merged from the same params tree; only the attention's cache
handling differs, as in glmjax/paged_inference.py (whose per-layer helpers it uses), so the
logits equal `mtp_forward`'s.

Prefix caching: the pair at a page's last position holds the token after the page, which the
page's hash does not cover, so a shared page may hold another sequence's pair there. That
changes drafts only, never outputs (speculative verification is exact), so MTP pages are
shared with the main ones as they are.
"""

import functools

import jax
import jax.numpy as jnp

from glmjax.config import GlmConfig
from glmjax.model import merge
from glmjax.moe import MoE
from glmjax.paged_attention import pages_shape, token_positions
from glmjax.paged_inference import KVPages, _attention, _moe, write_layer_kv


def init_mtp_pages(cfg: GlmConfig, num_pages: int, page_size: int,
                   dtype=jnp.bfloat16, heads_axis: str | None = None) -> KVPages:
    """A zeroed pool for the MTP layer: one layer's k and v, [K, P, L, H] each."""
    shape = pages_shape(cfg, num_pages, page_size, dtype)
    return KVPages(k=(jnp.zeros(shape.shape, shape.dtype),),
                   v=(jnp.zeros(shape.shape, shape.dtype),), heads_axis=heads_axis)


def mtp_pages_bytes(cfg: GlmConfig, num_pages: int, page_size: int,
                    dtype=jnp.bfloat16) -> int:
    """Bytes of the MTP layer's k and v pools (1 / num_hidden_layers of the main ones)."""
    shape = pages_shape(cfg, num_pages, page_size, dtype)
    return 2 * shape.size * jnp.dtype(dtype).itemsize


def _inputs(cfg: GlmConfig, params: dict, hidden: jax.Array, next_tokens: jax.Array):
    """The merged MTP module and its layer's input for the pairs (hidden [T, D],
    next_tokens [T]): [T, D]."""
    main, mtp = merge(cfg, params), merge(cfg, params, 'mtp')
    e = mtp.enorm(main.embed[...][next_tokens])  # [T, D]
    return mtp, jnp.concatenate([e, mtp.hnorm(hidden)], axis=-1) @ mtp.eh_proj[...]


def write_mtp_kv(cfg: GlmConfig, params: dict, hidden: jax.Array, next_tokens: jax.Array,
                 positions: jax.Array, pages: KVPages, kv_lens: jax.Array,
                 page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array
                 ) -> KVPages:
    """Only the K/V that `paged_mtp_hidden` writes for these pairs, with none of the layer
    past its key and value projections: what keeps the MTP pages current at a position whose
    MTP output nothing reads (a plain decode step of an engine that speculates)."""
    mtp, x = _inputs(cfg, params, hidden, next_tokens)
    k, v = write_layer_kv(mtp.layer.attn, mtp.layer.attn_norm(x), positions, pages.k[0],
                          pages.v[0], (kv_lens, page_indices, cu_q_lens, num_seqs))
    return pages.replace(k=(k,), v=(v,))


def paged_mtp_hidden(cfg: GlmConfig, params: dict, hidden: jax.Array, next_tokens: jax.Array,
                     positions: jax.Array, pages: KVPages, kv_lens: jax.Array,
                     page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, *,
                     attn_impl: str | None = None, tokens_per_row: int = 1
                     ) -> tuple[jax.Array, KVPages]:
    """The MTP layer over packed pairs: hidden [T, D] (main final hidden states, after the
    final norm) and next_tokens [T] (the token after each), at `positions` [T]. Writes the
    layer's K/V into `pages` (one layer) and returns its output after the head norm, [T, D]
    (what the lm_head reads, and what a further draft step feeds back), and the pages.
    The ragged batch (kv_lens, page_indices, cu_q_lens, num_seqs) is as in `paged_forward`,
    tokens_per_row as in `ragged_paged_attention`."""
    mtp, x = _inputs(cfg, params, hidden, next_tokens)
    batch = (kv_lens, page_indices, cu_q_lens, num_seqs)
    _, _, valid = token_positions(kv_lens, cu_q_lens, num_seqs, next_tokens.shape[0])
    layer = mtp.layer
    h, k, v = _attention(layer.attn, layer.attn_norm(x), positions, pages.k[0], pages.v[0],
                         batch, attn_impl, pages.heads_axis, tokens_per_row)
    x = x + h
    h = layer.mlp_norm(x)
    x = x + (_moe(layer.mlp, h, valid) if isinstance(layer.mlp, MoE) else layer.mlp(h))
    return mtp.head_norm(x), pages.replace(k=(k,), v=(v,))


@functools.partial(jax.jit, static_argnums=0, static_argnames='attn_impl',
                   donate_argnames='pages')
def paged_mtp_forward(cfg: GlmConfig, params: dict, hidden: jax.Array, next_tokens: jax.Array,
                      positions: jax.Array, pages: KVPages, kv_lens: jax.Array,
                      page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, *,
                      attn_impl: str | None = None) -> tuple[jax.Array, KVPages]:
    """`paged_mtp_hidden`, then the fp32 MTP logits after each row's last pair, [R, V] (the
    prediction of the token two past that pair's position), and the pages (donated)."""
    out, pages = paged_mtp_hidden(cfg, params, hidden, next_tokens, positions, pages, kv_lens,
                                  page_indices, cu_q_lens, num_seqs, attn_impl=attn_impl)
    last = jnp.clip(cu_q_lens[1:] - 1, 0, next_tokens.shape[0] - 1)  # [R]
    return merge(cfg, params).logits(out[last]), pages
