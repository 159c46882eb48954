"""glmjax-plan on the real GLM-4.6 sizes (as the command, in a subprocess with its own
simulated devices) against hand arithmetic; the layer extrapolation against a full compile."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

from glmjax import GlmConfig, sharding
from glmjax.sharding import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# GLM-4.6 by hand: 92 layers (3 dense) + the MTP layer, which is a MoE layer.
D, V, L, N, K, H = 5120, 151552, 92, 96, 8, 128
E, F, F_DENSE, DENSE = 160, 1536, 12288, 3
MOE_LAYERS = L - DENSE + 1
EXPERTS = MOE_LAYERS * E * 3 * F * D
ROUTERS = MOE_LAYERS * (D * E + E)
EMBED_AND_HEAD = 2 * V * D
ATTENTION = D * N * H * 2 + D * K * H * 2 + (N + 2 * K) * H + 2 * H  # q o k v, biases, qk-norm
OTHER = ((L + 1) * (ATTENTION + 2 * D) + MOE_LAYERS * 3 * F * D + DENSE * 3 * F_DENSE * D
         + D + 2 * D * D + 3 * D)  # layers' attention + norms, shared experts, dense FFNs,
#                                   final norm, MTP eh_proj and its 3 norms
PARAMS = EXPERTS + ROUTERS + EMBED_AND_HEAD + OTHER
KV_PER_TOKEN = 92 * 2 * 8 * 128 * 2


def glmjax_plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
    # The timeout catches a hang; how long the command takes is not this test's business.
    return subprocess.run([sys.executable, '-m', 'glmjax.sharding.plan', '--config', 'glm-4.6',
                           *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


def plan_json(*args: str) -> dict:
    done = glmjax_plan('--json', *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def near(got: float, want: float, rel: float = 0.05) -> bool:
    return abs(got - want) <= rel * want


def test_hand_count_is_glm46():
    assert near(PARAMS, 357e9, 0.01)


def test_glm46_bf16_fits_h200_with_expert_parallelism_but_not_h100():
    h200 = plan_json('--mesh', 'expert=8', '--device_memory_gb', '141', '--max_seq_len', '8192')
    assert h200['params'] == PARAMS
    # Experts split 8 ways; everything else is whole on every device (tensor=1).
    weights = 2 * (EXPERTS / 8 + EMBED_AND_HEAD + OTHER) + 4 * ROUTERS / 8
    assert near(h200['weights_bytes_per_device'], weights)
    assert h200['kv_bytes_per_token'] == KV_PER_TOKEN
    assert h200['kv_bytes_per_token_per_device'] == KV_PER_TOKEN  # attention replicated
    assert near(h200['kv_cache_bytes_per_device'], 8192 * KV_PER_TOKEN)
    assert h200['compiled_argument_bytes_per_device'] == h200['expected_argument_bytes_per_device']
    assert h200['fits']
    free = 141e9 - h200['weights_bytes_per_device'] - h200['temp_bytes_per_device']
    assert h200['kv_token_capacity'] == int(free // KV_PER_TOKEN) > 8192
    # Paged: the same memory in pages of 16 tokens, each whole on every device (tensor=1).
    assert h200['kv_page_bytes_per_device'] == 16 * KV_PER_TOKEN
    assert h200['kv_page_token_capacity'] == int(free // (16 * KV_PER_TOKEN)) * 16
    assert h200['sequences_of_max_seq_len'] == h200['kv_page_capacity'] // (8192 // 16)
    # Temporaries: the larger of a decode step's and a step of 8,192 prompt tokens (what
    # glmjax-serve may measure as its budget), within the 10% of memory that its pool leaves.
    assert h200['step_tokens'] == 8192
    assert h200['temp_bytes_per_device'] == max(h200['decode_temp_bytes_per_device'],
                                                h200['step_temp_bytes_per_device']) > 0
    # glmjax-serve's default pool: 90% of a device less the weights and temporaries.
    serve_free = 0.9 * 141e9 - h200['weights_bytes_per_device'] - h200['temp_bytes_per_device']
    assert h200['serve_default_pool_tokens'] == serve_free // h200['kv_page_bytes_per_device'] * 16
    assert 0 < h200['serve_default_pool_tokens'] < h200['kv_page_token_capacity']
    # Every sorted MoE implementation holds the step's [T * top_k, D] token-expert pairs.
    short = plan_json('--mesh', 'expert=8', '--device_memory_gb', '141', '--max_seq_len', '8192',
                      '--max_num_batched_tokens', '256')
    pairs = (8192 - 256) * 8 * D * 2
    assert h200['step_temp_bytes_per_device'] - short['step_temp_bytes_per_device'] > pairs
    assert short['kv_token_capacity'] > h200['kv_token_capacity']

    h100 = plan_json('--mesh', 'expert=8', '--device_memory_gb', '80', '--max_seq_len', '8192')
    assert not h100['fits'] and h100['kv_token_capacity'] == 0  # the weights alone are 119 GB


def test_glm46_fp8_fits_h100_with_tensor_parallelism():
    p = plan_json('--mesh', 'tensor=8', '--device_memory_gb', '80', '--weight_dtype', 'fp8')
    # Everything splits 8 ways; matrices at 1 byte, embedding and lm_head at 2.
    assert near(p['weights_bytes_per_device'], (PARAMS + EMBED_AND_HEAD) / 8)
    assert p['kv_bytes_per_token_per_device'] == KV_PER_TOKEN // 8  # 8 KV heads, 1 a device
    assert p['fits'] and p['kv_token_capacity'] > 32768
    assert p['kv_page_bytes_per_device'] == 16 * KV_PER_TOKEN // 8  # heads split as the cache
    assert p['compiled_argument_bytes_per_device'] == p['expected_argument_bytes_per_device']


def test_glm46_ep_tp_splits_attention_and_kv_over_the_experts_devices():
    """The same 8 H200s with rules ep_tp: the attention, shared experts and vocabulary split
    8 ways beside the experts, so a device holds 1/8 of each token's KV and 28x the
    tokens fit; the --kv_cache_gb printed makes exactly that pool."""
    ep = plan_json('--mesh', 'expert=8', '--device_memory_gb', '141', '--max_seq_len', '8192')
    tp = plan_json('--mesh', 'expert=8', '--device_memory_gb', '141', '--max_seq_len', '8192',
                   '--rules', 'ep_tp')
    assert tp['kv_bytes_per_token_per_device'] == KV_PER_TOKEN // 8
    # Everything split 8 ways but the norms (a few MB).
    assert near(tp['weights_bytes_per_device'], 2 * (EXPERTS + EMBED_AND_HEAD + OTHER) / 8
                + 4 * ROUTERS / 8, 0.01)
    assert ep['weights_bytes_per_device'] - tp['weights_bytes_per_device'] > 25e9
    assert tp['kv_page_token_capacity'] > 20 * ep['kv_page_token_capacity']  # 1.07M, 38K
    for p in (ep, tp):
        pool = p['kv_page_capacity'] * 16 * KV_PER_TOKEN  # what PagedEngine sizes from it
        assert p['kv_cache_gb_flag'] * 2 ** 30 <= pool < (p['kv_cache_gb_flag'] + 0.1) * 2 ** 30
    # The README's recipe: 32 rows of 32K do not all fit at full length, but 30 at once do.
    done = glmjax_plan('--mesh', 'expert=8', '--rules', 'ep_tp', '--device_memory_gb', '141',
                       '--max_batch', '32', '--max_seq_len', '32768')
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'with every row at full length: does not fit' in done.stdout
    assert 'FITS: room for 30 sequences of 32,768 tokens at once in KV pages (of max_batch ' \
           '32: the others wait' in done.stdout, done.stdout


def test_plan_report_and_errors():
    done = glmjax_plan('--mesh', 'expert=8', '--device_memory_gb', '141')
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'weights' in done.stdout and 'FITS' in done.stdout and 'KV capacity' in done.stdout
    assert '--kv_cache_gb' in done.stdout and '--rules ep_tp splits them' in done.stdout
    # GLM-4.5-Air on 8 devices of 36 GB: beside a step of 8,192 prompt tokens glmjax-serve's
    # default pool (90% less the weights and temporaries) holds less than one sequence;
    # beside one of 2,048 it holds more.
    for tokens, note in ('8192', True), ('2048', False):
        done = glmjax_plan('--config', 'glm-4.5-air', '--mesh', 'tensor=8',
                           '--device_memory_gb', '36', '--max_num_batched_tokens', tokens)
        assert done.returncode == 0, done.stderr[-3000:]
        assert 'FITS: room for' in done.stdout
        assert (re.search(r"note: glmjax-serve's default pool \(90% of a device less the "
                          r'weights and temporaries\) holds [\d,]+ tokens, less than one '
                          r'sequence of 32,768: give it --kv_cache_gb ', done.stdout)
                is not None) == note, done.stdout
        assert ("glmjax-serve's default pool (90% of a device less the weights and "
                'temporaries): ' in done.stdout) != note, done.stdout
    done = glmjax_plan('--mesh', 'expert=3')
    assert done.returncode != 0
    assert "give mesh axis 'expert' a size that divides 160" in done.stderr


def test_extrapolated_sizes_equal_a_full_compile():
    cfg = dataclasses.replace(
        GlmConfig.preset('glm-4.6'), vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=7, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
        first_k_dense_replace=2)
    mesh = sharding.make_mesh({'expert': 4, 'tensor': 2})
    params = sharding.with_shardings(plan.planned_params(cfg, jnp.bfloat16),
                                     sharding.param_shardings(cfg, mesh))
    full, _, counts = plan.compiled_sizes(cfg, mesh, params, jnp.bfloat16, 'decode_ep', 2, 64)
    assert counts == [3, 4, 5]
    compiled = plan.compile_decode(cfg, mesh, {'model': params['model']}, jnp.bfloat16,
                                   'decode_ep', 2, 64)
    assert full['arguments'] == compiled['arguments']
    assert full['outputs'] == compiled['outputs']
    assert full['temp'] == pytest.approx(compiled['temp'], rel=0.05)
