"""The hardware bounds and the work a step must do: bytes a decode step reads, FLOPs a
prefill runs, and this machine's copy bandwidth and matmul FLOP/s."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth() -> float:
    """Bytes/s of a large copy, counted as read + write. On the CPU numpy's copy (XLA:CPU's
    elementwise ops do not reach the memory bandwidth); on an accelerator a jitted one."""
    if jax.default_backend() == 'cpu':
        x = np.ones(256 * 2**20 // 4, np.float32)  # 256 MiB, far above the caches
        y = np.empty_like(x)
        return 2 * x.nbytes / median_time(lambda: np.copyto(y, x), 7)
    x = jnp.ones((1 << 30) // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    return 2 * x.nbytes / median_time(lambda: copy(x).block_until_ready(), 7)


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


def prefill_flops(cfg, params, batch, seq) -> float:
    """Multiply-adds x 2 of one prefill of `batch` prompts of `seq` tokens, as glmjax runs it:
    every weight a token uses (its top-k experts, not all), causal attention (on average
    seq / 2 keys per query), and the lm_head for the last position only."""
    m = params['model']
    elements = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
    per_token = 0
    for i, layer in m['layers'].items():
        per_token += elements(layer['attn'])
        mlp = layer['mlp']
        if not cfg.is_moe_layer(i):
            per_token += elements(mlp)
            continue
        experts = mlp['gate'].size + mlp['up'].size + mlp['down'].size
        per_token += experts // cfg.n_routed_experts * cfg.num_experts_per_tok
        per_token += elements(mlp['shared']) + mlp['router'].size
    attention = 2 * cfg.num_attention_heads * cfg.head_dim * seq / 2 * cfg.num_hidden_layers
    return 2 * batch * (seq * (per_token + attention) + m['lm_head'].size)


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul through XLA on the default device."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    return 2 * n ** 3 / median_time(lambda: mm(a, a).block_until_ready(), repeats)
