"""The serving sampler: settings per row as arrays, checked on logits whose answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.sampling import TOP_LOGPROBS, SamplingParams, sample

N = 4096  # draws per statistical check: 4 sigma of a frequency is at most 4 * 0.5 / 64 = 0.03
PROBS = np.array([0.5, 0.3, 0.15, 0.05] + [0.0] * 12, np.float32)


def draw(probs: np.ndarray, **settings) -> np.ndarray:
    """N draws from rows of identical logits, one seed per row."""
    logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)
    s = SamplingParams.make(N, **settings)
    s = s.replace(seed=np.arange(N, dtype=np.uint32))
    V = len(probs)
    tokens, *_ = jax.jit(sample)(jnp.tile(logits, (N, 1)), s, jnp.zeros((N, V), jnp.int32),
                                 jnp.zeros((N, V), bool), jnp.zeros((N,), jnp.int32))
    return np.asarray(tokens)


def frequencies(tokens: np.ndarray, V: int) -> np.ndarray:
    return np.bincount(tokens, minlength=V) / len(tokens)


def test_temperature_one_follows_the_distribution():
    np.testing.assert_allclose(frequencies(draw(PROBS, temperature=1.0), 16), PROBS, atol=0.03)


def test_temperature_reshapes_the_distribution():
    for t in (0.5, 2.0):
        expected = PROBS ** (1 / t) / np.sum(PROBS ** (1 / t))
        got = frequencies(draw(PROBS, temperature=t), 16)
        np.testing.assert_allclose(got, expected, atol=0.03)
        # and it is measurably not the t=1 distribution
        assert np.abs(got - PROBS).max() > 0.08


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    got = frequencies(draw(PROBS, temperature=1.0, top_p=0.7), 16)
    assert got[2:].sum() == 0  # 0.5 + 0.3 reaches 0.7: tokens 2.. are cut
    np.testing.assert_allclose(got[:2], [0.625, 0.375], atol=0.03)


def test_min_p_cuts_below_a_fraction_of_the_top_probability():
    got = frequencies(draw(PROBS, temperature=1.0, min_p=0.25), 16)  # floor 0.125
    assert got[3:].sum() == 0
    np.testing.assert_allclose(got[:3], PROBS[:3] / 0.95, atol=0.03)


def test_top_k_cuts_and_renormalises():
    got = frequencies(draw(PROBS, temperature=1.0, top_k=3), 16)
    assert got[3:].sum() == 0
    np.testing.assert_allclose(got[:3], PROBS[:3] / 0.95, atol=0.03)


def run(logits, counts=None, prompt_mask=None, index=None, **settings):
    B, V = logits.shape
    s = SamplingParams.make(B, **settings)
    counts = jnp.zeros((B, V), jnp.int32) if counts is None else counts
    prompt_mask = jnp.zeros((B, V), bool) if prompt_mask is None else prompt_mask
    index = jnp.zeros((B,), jnp.int32) if index is None else index
    return sample(jnp.asarray(logits), s, counts, prompt_mask, index)


def test_top_k_one_equals_greedy():
    logits = jax.random.normal(jax.random.key(0), (64, 100)) * 3
    greedy, *_ = run(logits, temperature=0.0)
    top1, *_ = run(logits, temperature=1.5, top_k=1, seed=7)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(top1, greedy)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = jnp.zeros((64, 100))  # uniform: every draw is up to the key
    a, *_ = run(logits, temperature=1.0, seed=123)
    b, *_ = run(logits, temperature=1.0, seed=123)
    c, *_ = run(logits, temperature=1.0, seed=124)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).sum() > 32
    # The key depends on the output index: the next token of the same request differs.
    d, *_ = run(logits, temperature=1.0, seed=123, index=jnp.ones((64,), jnp.int32))
    assert (np.asarray(a) != np.asarray(d)).sum() > 32


def test_repetition_penalty_applies_to_prompt_tokens():
    logits = jnp.array([[2.0, 1.9, -1.0, -1.2]])
    seen = jnp.array([[True, False, False, False]])
    assert int(run(logits, prompt_mask=seen, temperature=0.0)[0][0]) == 0
    # 2.0 / 2 = 1.0 < 1.9
    assert int(run(logits, prompt_mask=seen, temperature=0.0, repetition_penalty=2.0)[0][0]) == 1
    # negative logits are pushed further down: -1.0 * 1.5 = -1.5 < -1.2
    masked = jnp.array([[-9.0, -9.0, -1.0, -1.2]])
    seen2 = jnp.array([[False, False, True, False]])
    assert int(run(masked, prompt_mask=seen2, temperature=0.0,
                   repetition_penalty=1.5)[0][0]) == 3


def test_presence_and_frequency_penalties_use_output_counts():
    logits = jnp.array([[3.0, 2.0, 0.0]])
    counts = jnp.array([[2, 0, 0]], jnp.int32)
    assert int(run(logits, counts, temperature=0.0, presence_penalty=0.5)[0][0]) == 0
    assert int(run(logits, counts, temperature=0.0, presence_penalty=1.5)[0][0]) == 1
    assert int(run(logits, counts, temperature=0.0, frequency_penalty=0.4)[0][0]) == 0
    assert int(run(logits, counts, temperature=0.0, frequency_penalty=0.6)[0][0]) == 1


def test_logit_bias_per_row():
    logits = jnp.zeros((2, 10)).at[:, 0].set(5.0)
    s = SamplingParams.make(2, temperature=0.0, logit_bias={7: 10.0})
    s = s.replace(bias_values=s.bias_values * np.array([[1.0], [0.0]], np.float32))
    tokens, *_ = sample(logits, s, jnp.zeros((2, 10), jnp.int32), jnp.zeros((2, 10), bool),
                        jnp.zeros((2,), jnp.int32))
    assert tokens.tolist() == [7, 0]
    banned = run(logits, temperature=1.0, logit_bias={0: -100.0})[0]
    assert int(banned[0]) != 0


def test_logprobs_are_the_model_distribution():
    logits = jax.random.normal(jax.random.key(1), (3, 50))
    tokens, chosen, top_ids, top_lps = run(logits, temperature=1.0, seed=5,
                                           presence_penalty=1.0, logit_bias={3: 50.0})
    ref = jax.nn.log_softmax(logits, -1)
    assert tokens.tolist() == [3, 3, 3]  # the bias decided the token ...
    np.testing.assert_allclose(chosen, ref[:, 3], atol=1e-6)  # ... but not its logprob
    order = np.argsort(-np.asarray(ref), axis=-1)[:, :TOP_LOGPROBS]
    np.testing.assert_array_equal(top_ids, order)
    np.testing.assert_allclose(top_lps, np.take_along_axis(np.asarray(ref), order, -1),
                               atol=1e-6)


@pytest.mark.parametrize('settings', [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9),
                                      dict(temperature=0.7, top_k=5, min_p=0.1)])
def test_rows_do_not_affect_each_other(settings):
    """A row's token depends only on its own logits and settings (continuous batching)."""
    logits = jax.random.normal(jax.random.key(2), (8, 64)) * 2
    alone = [int(run(logits[i:i + 1], seed=i, **settings)[0][0]) for i in range(8)]
    s = SamplingParams.make(8, **settings).replace(seed=np.arange(8, dtype=np.uint32))
    together, *_ = sample(logits, s, jnp.zeros((8, 64), jnp.int32), jnp.zeros((8, 64), bool),
                          jnp.zeros((8,), jnp.int32))
    assert together.tolist() == alone
