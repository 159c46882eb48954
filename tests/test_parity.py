"""Whole-model parity with transformers' Glm4MoeForCausalLM on tiny configs (fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from glmjax import GlmConfig, forward, generate, load_hf

# Together: qk-norm on/off; first_k_dense_replace 0, 1, 3; scaling 1.0 and 2.5;
# norm_topk_prob on/off; grouped routing; attention bias on/off; MHA and GQA; a rotary
# fraction other than 1/2; the 4.x and 5.x config spellings.
CONFIGS = {
    'glm46_like': dict(),
    'air_like': dict(use_qk_norm=False, first_k_dense_replace=1, routed_scaling_factor=1.0),
    'all_moe_no_bias': dict(first_k_dense_replace=0, attention_bias=False,
                            norm_topk_prob=False, routed_scaling_factor=1.0),
    'dense3_grouped': dict(num_hidden_layers=4, first_k_dense_replace=3, n_group=4,
                           topk_group=2, n_routed_experts=16, num_experts_per_tok=4),
    'grouped_unnormalised': dict(n_group=2, topk_group=1, norm_topk_prob=False,
                                 use_qk_norm=False, num_key_value_heads=4),
    'quarter_rotary_legacy': dict(
        head_dim=32, num_attention_heads=8, num_key_value_heads=1,
        rope_parameters={'rope_type': 'default', 'rope_theta': 1e6,
                         'partial_rotary_factor': 0.25}),
}


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_and_greedy_match_transformers(name, tmp_path):
    model = hf_tiny.make_model(seed=len(name), **CONFIGS[name])
    hf_tiny.save(model, tmp_path)
    if name.endswith('legacy'):
        hf_tiny.legacy_config(tmp_path)
    cfg = GlmConfig.from_hf(tmp_path)
    params = load_hf(tmp_path, cfg, dtype=jnp.float32)

    prompts = hf_tiny.prompts(cfg.vocab_size)
    T = max(len(p) for p in prompts)
    padded = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    ours = np.asarray(forward(cfg, params, jnp.asarray(padded)))
    for i, p in enumerate(prompts):
        ref = hf_tiny.torch_logits(model, p)
        np.testing.assert_allclose(ours[i, :len(p)], ref, rtol=0, atol=1e-4)

    greedy = generate(cfg, params, prompts, 32, stop_ids=())
    for p, got in zip(prompts, greedy):
        assert got == hf_tiny.torch_greedy(model, p, 32)
