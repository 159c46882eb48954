"""What one decode step must read: the numerator of bandwidth utilisation."""

import jax


def active_bytes(cfg, params, batch, seq) -> int:
    """Bytes one decode step must read: attention, norms, dense MLPs, top-k + shared
    experts and routers of each MoE layer, the lm_head, and the KV cache read."""
    m = params['model']
    size = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    total = size(m['lm_head']) + size(m['norm'])
    for i, layer in m['layers'].items():
        total += size(layer['attn']) + size(layer['attn_norm']) + size(layer['mlp_norm'])
        mlp = layer['mlp']
        if not cfg.is_moe_layer(i):
            total += size(mlp)
            continue
        per_expert = (mlp['gate'].nbytes + mlp['up'].nbytes + mlp['down'].nbytes)
        used = min(cfg.n_routed_experts, batch * cfg.num_experts_per_tok)
        total += per_expert // cfg.n_routed_experts * used
        total += size(mlp['shared']) + mlp['router'].nbytes + mlp['router_bias'].nbytes
    itemsize = m['embed'].dtype.itemsize  # the KV cache has the weights' dtype
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize * seq * batch
    return total + kv
