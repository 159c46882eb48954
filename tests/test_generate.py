"""generate: greedy and sampled continuation, stop ids, and bad arguments."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import GlmConfig, forward, generate, init_params

CFG = dataclasses.replace(
    GlmConfig.preset('glm-4.6'), vocab_size=300, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    first_k_dense_replace=1, max_position_embeddings=128, eos_token_ids=(7,))


@pytest.fixture(scope='module')
def params():
    return init_params(CFG, jnp.float32, seed=2)


def test_greedy_is_argmax_of_forward(params):
    prompt = [3, 14, 15, 92, 65]
    out = generate(CFG, params, [prompt], 6, stop_ids=())[0]
    seq = list(prompt)
    for _ in range(6):
        logits = forward(CFG, params, jnp.asarray([seq], jnp.int32))
        seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
    assert out == seq[len(prompt):]


def test_sampling_is_seeded_and_top_k_1_is_greedy(params):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    greedy = generate(CFG, params, prompts, 12, stop_ids=())
    assert generate(CFG, params, prompts, 12, temperature=5.0, top_k=1, stop_ids=()) == greedy
    a = generate(CFG, params, prompts, 12, temperature=5.0, seed=1, stop_ids=())
    assert a == generate(CFG, params, prompts, 12, temperature=5.0, seed=1, stop_ids=())
    assert a != generate(CFG, params, prompts, 12, temperature=5.0, seed=2, stop_ids=())
    assert a != greedy


def test_stops_after_a_stop_id(params):
    full = generate(CFG, params, [[1, 2, 3]], 16, stop_ids=())[0]
    stop = full[5]
    cut = generate(CFG, params, [[1, 2, 3]], 16, stop_ids=(stop,))[0]
    assert cut == full[:full.index(stop) + 1]


@pytest.mark.parametrize('prompts, n, match', [
    ([], 4, 'at least one prompt'),
    ([[1], []], 4, 'no empty prompt'),
    ([[1, 2]], 0, 'max_new_tokens'),
    ([[1] * 100], 40, 'exceeds the context of 128'),
    ([[1, 300]], 4, 'token id 300 is outside the vocabulary'),
    ([[-1]], 4, 'token id -1'),
])
def test_bad_arguments(params, prompts, n, match):
    with pytest.raises(ValueError, match=match):
        generate(CFG, params, prompts, n)
