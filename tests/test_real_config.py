"""The real GLM-4.6 (and Air) sizes, checked abstractly: nothing is allocated."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp

from glmjax import GlmConfig, abstract_params, param_axes
from glmjax.hf import hf_tensor_shapes

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'glm-4.6-config.json'


def glm46() -> GlmConfig:
    return GlmConfig.from_hf(FIXTURE)


def published_names(L, D, N, K, H, F, E, Fm, V, dense, qk_norm=True):
    """The tensor names and shapes of a published GLM-4.x checkpoint, layer L being MTP."""
    names = {'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,),
             'lm_head.weight': (V, D)}
    for i in range(L + 1):
        p = f'model.layers.{i}.'
        a = p + 'self_attn.'
        names.update({p + 'input_layernorm.weight': (D,),
                      p + 'post_attention_layernorm.weight': (D,),
                      a + 'q_proj.weight': (N * H, D), a + 'q_proj.bias': (N * H,),
                      a + 'k_proj.weight': (K * H, D), a + 'k_proj.bias': (K * H,),
                      a + 'v_proj.weight': (K * H, D), a + 'v_proj.bias': (K * H,),
                      a + 'o_proj.weight': (D, N * H)})
        if qk_norm:
            names.update({p + 'self_attn.q_norm.weight': (H,), p + 'self_attn.k_norm.weight': (H,)})
        if i < dense:
            names.update({p + 'mlp.gate_proj.weight': (F, D), p + 'mlp.up_proj.weight': (F, D),
                          p + 'mlp.down_proj.weight': (D, F)})
            continue
        names.update({p + 'mlp.gate.weight': (E, D), p + 'mlp.gate.e_score_correction_bias': (E,)})
        for e in range(E):
            q = f'{p}mlp.experts.{e}.'
            names.update({q + 'gate_proj.weight': (Fm, D), q + 'up_proj.weight': (Fm, D),
                          q + 'down_proj.weight': (D, Fm)})
        q = p + 'mlp.shared_experts.'
        names.update({q + 'gate_proj.weight': (Fm, D), q + 'up_proj.weight': (Fm, D),
                      q + 'down_proj.weight': (D, Fm)})
    p = f'model.layers.{L}.'
    names.update({p + 'enorm.weight': (D,), p + 'hnorm.weight': (D,),
                  p + 'eh_proj.weight': (D, 2 * D), p + 'shared_head.norm.weight': (D,)})
    return names


def test_fixture_matches_preset():
    assert glm46() == GlmConfig.preset('glm-4.6')
    assert json.loads(FIXTURE.read_text())['num_hidden_layers'] == 92


def test_glm46_parameter_count_is_355b():
    params = abstract_params(glm46(), jnp.bfloat16)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    total = sum(math.prod(x.shape) for x in leaves)
    assert abs(total - 355e9) / 355e9 < 0.01, total
    # Active per token: attention, dense layers, 8 routed + 1 shared expert: about 32B.
    cfg = glm46()
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert * 90
    active = total - inactive - cfg.vocab_size * cfg.hidden_size  # the embedding is a lookup
    assert 30e9 < active < 36e9, active


def test_air_parameter_count_is_106b():
    # The published 106B counts the decoder stack without the MTP layer.
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(
        abstract_params(GlmConfig.preset('glm-4.5-air'), mtp=False)))
    assert abs(total - 106e9) / 106e9 < 0.01, total


def test_every_published_tensor_is_accounted_for():
    cfg = glm46()
    expected = published_names(L=92, D=5120, N=96, K=8, H=128, F=12288, E=160, Fm=1536,
                               V=151552, dense=3)
    ours = hf_tensor_shapes(cfg)
    assert set(ours) - set(expected) == set()
    assert set(expected) - set(ours) == set()
    assert {n: tuple(s) for n, s in ours.items()} == expected


def test_every_parameter_names_its_axes():
    axes = param_axes(glm46())
    shapes = abstract_params(glm46())
    for a, s in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                    jax.tree.leaves(shapes)):
        assert len(a) == len(s.shape)
    layer = axes['model']['layers'][5]
    assert layer['mlp']['gate'] == ('experts', 'moe_mlp', 'embed')
    assert layer['attn']['k'] == ('embed', 'kv_heads', 'head_dim')
    assert axes['model']['embed'] == ('vocab', 'embed')
