"""The MoE block: sigmoid router with correction bias, routed experts, shared expert.

Routing follows transformers' Glm4MoeTopkRouter exactly: the correction bias steers which
experts are chosen but the weights are the unbiased sigmoid scores. No token is dropped.

The routed experts have more than one implementation, all computing the same sums:
- `dense`: every expert on every token, weighted by a mostly-zero [T, E] matrix: E/top_k
  times the work. The reference the others are checked against.
- `gather`: each token reads only its top_k experts' weights. For small decode batches,
  where reading all E experts would be the whole cost.
- `grouped`: tokens sorted by expert and a grouped matmul (`ragged_dot`). For prefill and
  large batches on accelerators (on XLA:CPU ragged_dot is decomposed and slow).
- `tiled`: tokens sorted by expert, each expert's weights read once and its rows run in
  tiles of plain matmuls. The same work as `grouped` whatever the routing.
- `batched`: each expert's tokens in a block of C rows (C chosen per call, from the mean
  group size to twice it), one batched matmul that reads every expert's weights once, in
  place; `tiled` for the pairs of larger groups past C. The fastest on CPU from one pair
  per expert up (BENCHMARKS.md).
The sorted ones (`grouped`, `tiled`, `batched`) compute no pair of routing weight 0: padding
tokens of a ragged batch, and under expert parallelism the experts of other shards.
Under a mesh with an `expert` axis > 1 (`jax.set_mesh`) any of them runs expert-parallel:
each shard over its own experts, the partial sums added by a psum (`experts_parallel`).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from glmjax.config import GlmConfig
from glmjax.layers import MLP, param
from glmjax.mesh_axes import EXPERT

ROUTER_STD = 0.02


def route(cfg: GlmConfig, x: jax.Array, router: jax.Array, bias: jax.Array):
    """x: [T, D] -> (weights [T, k] fp32, expert ids [T, k] int32)."""
    logits = x.astype(jnp.float32) @ router.astype(jnp.float32)  # [T, E]
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias
    if cfg.n_group > 1:
        T, E, G = choice.shape[0], cfg.n_routed_experts, cfg.n_group
        grouped = choice.reshape(T, G, E // G)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], keep].set(True)
        choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(T, E)
    _, ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def experts_dense(x, weights, ids, gate, up, down):
    """x: [T, D]; weights, ids: [T, k]; gate, up, down: [E, F, D].

    All experts as two large matmuls over the flattened [E*F, D] weights (one pass over
    memory), each expert's hidden units scaled by its combine weight (0 for the unchosen).
    """
    T = x.shape[0]
    E, F, D = gate.shape
    combine = jnp.zeros((T, E), jnp.float32).at[jnp.arange(T)[:, None], ids].add(weights)
    h = (jax.nn.silu(x @ gate.reshape(E * F, D).T) * (x @ up.reshape(E * F, D).T))
    h = (h.reshape(T, E, F) * combine[:, :, None].astype(h.dtype)).reshape(T, E * F)
    return h @ down.reshape(E * F, D)


def experts_gather(x, weights, ids, gate, up, down):
    """Token by token, only the k chosen experts' weights are read: [k*F, D] matrices."""
    _, F, D = gate.shape

    def one(args):
        x, w, ids = args
        k = ids.shape[0]
        h = (jax.nn.silu(gate[ids].reshape(k * F, D) @ x) * (up[ids].reshape(k * F, D) @ x))
        h = (h.reshape(k, F) * w[:, None].astype(h.dtype)).reshape(k * F)
        return h @ down[ids].reshape(k * F, D)

    return jax.lax.map(one, (x, weights, ids))


def experts_grouped(x, weights, ids, gate, up, down):
    """The token-expert pairs sorted by expert and grouped matmuls (`ragged_dot`) over them.
    Pairs of weight 0 (padding tokens, experts on other shards) sort past every group, so the
    kernels never compute them: under expert parallelism each shard computes its own pairs,
    not every token's."""
    T, k = ids.shape
    E = gate.shape[0]
    order, group, sizes, _ = _sort_pairs(weights, ids, E)
    sizes = sizes.astype(jnp.int32)
    tokens = x[order // k]  # [T*k, D], grouped by expert, then the pairs of no group
    # gate/up are [E, F, D]: contract the tokens' D with the weights' last dim.
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0])
    h = (jax.nn.silu(jax.lax.ragged_dot_general(tokens, gate, sizes, dims))
         * jax.lax.ragged_dot_general(tokens, up, sizes, dims))
    y = jax.lax.ragged_dot(h, down, sizes)  # [T*k, D]; rows past the groups: not read
    dest = jnp.where(group < E, jnp.arange(T * k), T * k)
    return _combine(y, dest, order, weights, T, k)


def _sort_pairs(weights, ids, E):
    """The token-expert pairs in expert order. Returns (order: pair index of each sorted
    slot, group: its expert, E for a pair of weight 0 (experts on other shards: never
    computed), sizes: [E] pairs per expert, rank: each sorted pair's place in its group)."""
    key = jnp.where(weights > 0, ids, E).reshape(-1)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=E + 1)
    group = key[order]
    rank = jnp.arange(key.shape[0]) - (jnp.cumsum(sizes) - sizes)[group]
    return order, group, sizes[:E], rank


def _combine(y, dest, order, weights, T, k):
    """Each pair's output row (at `dest` in y; past the end: none) times its weight, summed
    per token."""
    pair_w = weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jax.ops.segment_sum(y.at[dest].get(mode='fill', fill_value=0) * pair_w, order // k,
                               num_segments=T)


def tile_rows(pairs: int, experts: int) -> tuple[int, int]:
    """Rows per tile for `experts_tiled`: large tiles for whole runs of a group (efficient
    matmuls), then small ones for the rest (about the mean group size, a power of two in
    [8, 32]), so that under `small` rows are computed past each group."""
    mean = max(1, pairs // experts)
    return 256, int(min(32, max(8, 1 << (mean - 1).bit_length())))


def experts_tiled(x, weights, ids, gate, up, down):
    """The token-expert pairs sorted by expert; for each expert that has any, its weights
    read once and its rows run through plain matmuls in tiles of `tile_rows`. The last tile
    of a group runs on into the next group's rows, which that group's own tiles (later in
    the loop) overwrite: no padding between groups, and work for only the chosen pairs,
    whatever the routing. Exact and dropless; pairs of weight 0 (experts on other shards)
    are left out."""
    T, k = ids.shape
    E, F, D = gate.shape
    n = T * k
    big, small = tile_rows(n, E)
    order, group, sizes, rank = _sort_pairs(weights, ids, E)
    starts = jnp.cumsum(sizes) - sizes
    # `big` rows of room past the pairs, so that no tile's slice is moved back (clamped).
    rows = jnp.zeros((n + big, D), x.dtype).at[:n].set(x[order // k])
    present = jnp.nonzero(sizes, size=E, fill_value=0)[0]

    def expert(i, y):
        e = present[i]
        g, u, d = gate[e], up[e], down[e]  # one copy of this expert's weights

        def tiles(size, first, count, y):
            def one(j, y):
                xt = jax.lax.dynamic_slice_in_dim(rows, first + j * size, size)
                h = jax.nn.silu(xt @ g.T) * (xt @ u.T)
                return jax.lax.dynamic_update_slice_in_dim(y, h @ d, first + j * size, 0)
            return jax.lax.fori_loop(0, count, one, y)

        whole = sizes[e] // big
        y = tiles(big, starts[e], whole, y)
        rest = sizes[e] - whole * big
        return tiles(small, starts[e] + whole * big, -(-rest // small), y)

    y = jax.lax.fori_loop(0, jnp.sum(sizes > 0), expert, jnp.zeros_like(rows))
    dest = jnp.where(group < E, jnp.arange(n), n + big)
    return _combine(y, dest, order, weights, T, k)


# `tiled`'s cost in `batched` rows, measured (BENCHMARKS.md): per pair, and per expert (the
# copy of its weights).
TILED_PAIR, TILED_EXPERT = 2, 64


def capacities(pairs: int, experts: int, tokens: int) -> list[int]:
    """Rows per expert that `experts_batched` compiles for: from the mean group size up to
    twice it (and at least 8 above it), four steps per doubling, at most `tokens` (no group
    is larger: a token picks distinct experts)."""
    mean = -(-pairs // experts)
    upper = max(2 * mean, mean + 8)
    steps = sorted({p * m // 4 for i in range(tokens.bit_length() + 1) for p in [1 << i]
                    for m in (4, 5, 6, 7) if p * m % 4 == 0})
    caps = [c for c in steps if mean <= c <= upper and c < tokens]
    return caps + [tokens] if tokens <= upper else caps


def experts_batched(x, weights, ids, gate, up, down):
    """Each expert's pairs in a block of C rows and one batched matmul over all experts:
    every expert's weights are read once, in place (the fastest on CPU). The pairs of a
    group past C go through `experts_tiled`, which pays only for the pairs it gets. C is
    chosen per call from `capacities` for the least cost, in rows:
    E * C + TILED_PAIR * (pairs past C) + TILED_EXPERT * (groups past C). So uneven routing
    costs only its extra pairs. Exact and dropless."""
    T, k = ids.shape
    E, F, D = gate.shape
    order, group, sizes, rank = _sort_pairs(weights, ids, E)
    caps = capacities(T * k, E, T)
    cap_sizes = jnp.asarray(caps)

    def blocks(C):
        def run(x, weights):
            dest = jnp.where((group < E) & (rank < C), group * C + rank, E * C)
            rows = jnp.zeros((E * C, D), x.dtype).at[dest].set(x[order // k], mode='drop')
            # The weights lead each matmul, contracted in their stored [E, F, D] layout: the
            # forms XLA:CPU runs fastest at small C (BENCHMARKS.md).
            xt = rows.reshape(E, C, D).transpose(0, 2, 1)  # [E, D, C]
            h = (jax.nn.silu(jnp.einsum('efd,edc->efc', gate, xt))
                 * jnp.einsum('efd,edc->efc', up, xt))
            y = jnp.einsum('efc,efd->ecd', h, down).reshape(E * C, D)
            return _combine(y, dest, order, weights, T, k)
        return run

    over = jnp.maximum(sizes[None, :] - cap_sizes[:, None], 0)  # [caps, E]: pairs past C
    past = over.sum(1)
    choice = jnp.argmin(E * cap_sizes + TILED_PAIR * past + TILED_EXPERT * (over > 0).sum(1))
    y = jax.lax.switch(choice, [blocks(C) for C in caps], x, weights)
    # The pairs past the chosen capacity, by their place in their expert's group.
    place = jnp.zeros(T * k, rank.dtype).at[order].set(rank).reshape(T, k)
    rest = jnp.where(place >= cap_sizes[choice], weights, 0.0)
    return y + jax.lax.cond(past[choice] > 0, experts_tiled, lambda x, *_: jnp.zeros_like(x),
                            x, rest, ids, gate, up, down)


EXPERT_IMPLS = {'dense': experts_dense, 'gather': experts_gather, 'grouped': experts_grouped,
                'tiled': experts_tiled, 'batched': experts_batched}


def choose_impl(cfg: GlmConfig, num_tokens: int) -> str:
    """Measured choice per backend (BENCHMARKS.md): gather when the token-expert pairs touch
    fewer experts than exist, else batched on CPU (XLA:CPU's ragged dot computes every group
    for every row) and grouped elsewhere."""
    if num_tokens * cfg.num_experts_per_tok < cfg.n_routed_experts:
        return 'gather'
    return 'batched' if jax.default_backend() == 'cpu' else 'grouped'


def expert_shards() -> int:
    """Size of the `expert` axis of the mesh set with `jax.set_mesh` (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(EXPERT, 1)


def experts_parallel(impl: str, x, weights, ids, gate, up, down):
    """Expert parallelism: each shard of the mesh's `expert` axis runs `impl` over its own
    E/n experts for every token (the tokens are replicated; the other shards' experts get
    weight 0) and a psum adds the shards' partial sums. Exact and dropless. The other mesh
    axes stay automatic inside (e.g. the experts' width split over `tensor`)."""
    E, n = gate.shape[0], expert_shards()
    if E % n:
        raise ValueError(f'{E} experts do not split over the mesh axis {EXPERT}={n}')

    def local(x, weights, ids, gate, up, down):
        first = jax.lax.axis_index(EXPERT) * (E // n)
        mine = (ids >= first) & (ids < first + E // n)
        ids, weights = jnp.where(mine, ids - first, 0), jnp.where(mine, weights, 0.0)
        y = EXPERT_IMPLS[impl](x, weights, ids, gate, up, down)  # [T, D], this shard's part
        return jax.lax.psum(y.astype(jnp.float32), EXPERT).astype(y.dtype)

    replicated, split = PartitionSpec(), PartitionSpec(EXPERT)
    # Unchecked varying axes: `tiled`'s loops carry arrays that become shard-dependent only
    # inside the loop body, which the check would make each implementation cast by hand.
    return jax.shard_map(local, in_specs=(replicated,) * 3 + (split,) * 3, out_specs=replicated,
                         axis_names={EXPERT}, check_vma=False)(x, weights, ids, gate, up, down)


class MoE(nnx.Module):
    def __init__(self, cfg: GlmConfig, dtype, rngs: nnx.Rngs | None):
        self.cfg = cfg
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        # The router stays fp32 whatever the model dtype, as in the released checkpoints.
        self.router = param(rngs, (D, E), ('embed', 'experts'), jnp.float32, std=ROUTER_STD)
        self.router_bias = param(rngs, (E,), ('experts',), jnp.float32, init='zeros')
        # [E, F, D] for all three, so that the experts flatten to [E*F, D] matrices.
        self.gate = param(rngs, (E, F, D), ('experts', 'moe_mlp', 'embed'), dtype)
        self.up = param(rngs, (E, F, D), ('experts', 'moe_mlp', 'embed'), dtype)
        self.down = param(rngs, (E, F, D), ('experts', 'moe_mlp', 'embed'), dtype)
        # A dense FFN beside the experts: split as the dense layers' FFN, not as an expert.
        self.shared = MLP(cfg, cfg.shared_intermediate_size, 'mlp', dtype, rngs)

    def __call__(self, x: jax.Array, impl: str | None = None) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, ids = route(self.cfg, flat, self.router[...], self.router_bias[...])
        impl = impl or choose_impl(self.cfg, B * T)
        experts = (self.gate[...], self.up[...], self.down[...])
        if expert_shards() > 1:
            routed = experts_parallel(impl, flat, weights, ids, *experts)
        else:
            routed = EXPERT_IMPLS[impl](flat, weights, ids, *experts)
        return routed.reshape(B, T, D) + self.shared(x)
