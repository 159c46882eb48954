"""MTP speculative decoding: the paged MTP layer equals `mtp_forward`, its drafts equal a
no-cache chain, `verify` samples each position from exactly `sample`'s distribution (chi-square
on a tiny vocabulary, with a power check), and a speculative loop over the pages decodes
greedily exactly as `generate` does, whatever the drafts (k = 1, 2, 3, mixed prompt lengths
across page boundaries, a stop id and the budget inside an accepted run)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import GlmConfig, generate, hidden_states, mtp_forward
from glmjax.model import abstract_params, merge
from glmjax.paged_inference import init_pages
from glmjax.paged_mtp import (
    init_mtp_pages,
    paged_mtp_forward,
    paged_mtp_hidden,
    write_mtp_kv,
)
from glmjax.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    row_keys,
    sample,
    scale,
)
from glmjax.speculative import (
    SpecRows,
    _targets,
    propose,
    redraft,
    speculative_step,
    verify,
    verify_forward,
)

# 128 experts: every batch here is small enough for the `gather` experts, the quickest to
# compile (the others equal it, tests/test_modules.py); layer 1 and the MTP layer are MoE.
CFG = dataclasses.replace(
    GlmConfig.preset('glm-4.6'), vocab_size=300, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    moe_intermediate_size=16, n_routed_experts=128, num_experts_per_tok=2,
    first_k_dense_replace=1, max_position_embeddings=128, eos_token_ids=(7,))
PAGE, PAGES_PER_ROW, ROWS = 4, 10, 3  # every loop shares these shapes: one compile per k
PROMPTS = ([5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [11, 3, 250])
MAX_NEW = 14


@pytest.fixture(scope='module')
def params():
    """Random weights drawn on the host (init_params compiles a kernel per weight shape):
    normal(0, 0.02) matrices, vectors (norm weights, the router's bias) at 1."""
    rng = np.random.RandomState(2)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0, 0.02, a.shape) if a.ndim > 1 else np.ones(a.shape),
                              a.dtype), abstract_params(CFG, jnp.float32))


def tables(rows=ROWS, width=PAGES_PER_ROW):
    """Each row its own pages, in order (page 0 is scratch)."""
    return jnp.asarray(1 + np.arange(rows * width, dtype=np.int32).reshape(rows, width))


# --- the paged MTP layer ---

@functools.partial(jax.jit, static_argnums=0)
def _mtp_logits(cfg, params, *args):
    out, pages = paged_mtp_hidden(cfg, params, *args)
    return merge(cfg, params).logits(out), pages


def packed(rows, begin, end, T):
    """The ragged batch of rows r's positions begin[r]..end[r]-1, padded to T tokens."""
    index = [(r, p) for r in range(len(rows)) for p in range(begin[r], end[r])]
    pad = T - len(index)
    cu = np.concatenate([[0], np.cumsum(np.subtract(end, begin))]).astype(np.int32)
    return index + [index[-1]] * pad, cu


def test_paged_mtp_matches_mtp_forward(params):
    lengths, first = [5, 11, 3], [3, 7, 2]  # two calls, each row crossing pages of 4
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, CFG.vocab_size, (3, 16)).astype(np.int32)
    h = hidden_states(CFG, params, jnp.asarray(tokens))
    nxt = np.concatenate([tokens[:, 1:], rng.randint(0, 300, (3, 1))], 1).astype(np.int32)
    ref = np.asarray(mtp_forward(CFG, params, h, jnp.asarray(nxt)))  # [3, 16, V]
    pages = init_mtp_pages(CFG, 1 + 3 * PAGES_PER_ROW, PAGE, jnp.float32)
    h = np.asarray(h)
    for begin, end in ((np.zeros(3, int), first), (first, lengths)):
        index, cu = packed(range(3), begin, end, 16)
        r, p = np.array(index).T
        args = (jnp.asarray(h[r, p]), jnp.asarray(nxt[r, p]), jnp.asarray(p, jnp.int32))
        batch = (jnp.asarray(end, jnp.int32), tables(), jnp.asarray(cu),
                 jnp.array([3], jnp.int32))
        logits, pages = _mtp_logits(CFG, params, *args, pages, *batch)
        real = cu[-1]
        np.testing.assert_allclose(np.asarray(logits)[:real], ref[r, p][:real], rtol=0,
                                   atol=1e-5)
    last, _ = paged_mtp_forward(CFG, params, *args, pages, *batch)
    np.testing.assert_allclose(np.asarray(last), ref[[0, 1, 2], np.subtract(lengths, 1)],
                               rtol=0, atol=1e-5)


def test_mtp_kv_alone_writes_what_the_whole_layer_writes(params):
    """A plain decode step of a speculating engine writes only the MTP layer's K/V; the
    drafts that follow read them, so they must be the whole layer's."""
    rng = np.random.RandomState(1)
    end = np.array([6, 1, 9])
    index, cu = packed(range(3), np.zeros(3, int), end, 16)
    r, p = np.array(index).T
    args = (jnp.asarray(rng.normal(0, 1, (16, CFG.hidden_size)), jnp.float32),
            jnp.asarray(rng.randint(0, CFG.vocab_size, 16), jnp.int32), jnp.asarray(p, jnp.int32))
    batch = (jnp.asarray(end, jnp.int32), tables(), jnp.asarray(cu), jnp.array([3], jnp.int32))
    fresh = functools.partial(init_mtp_pages, CFG, 1 + 3 * PAGES_PER_ROW, PAGE, jnp.float32)
    _, whole = _mtp_logits(CFG, params, *args, fresh(), *batch)
    alone = jax.jit(write_mtp_kv, static_argnums=0)(CFG, params, *args, fresh(), *batch)
    for a, b in ((whole.k[0], alone.k[0]), (whole.v[0], alone.v[0])):
        assert np.abs(np.asarray(b)).max() > 0.1  # something was written
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _mtp_out(cfg, params, hidden, next_tokens):
    """The MTP layer's output after its head norm, without a cache: [B, T, D]."""
    main, mtp = merge(cfg, params), merge(cfg, params, 'mtp')
    x = jnp.concatenate([mtp.enorm(main.embed[...][next_tokens]), mtp.hnorm(hidden)],
                        -1) @ mtp.eh_proj[...]
    positions = jnp.broadcast_to(jnp.arange(hidden.shape[1]), next_tokens.shape)
    return mtp.head_norm(mtp.layer(x, positions)[0])


def reference_drafts(params, h, nxt, n, k):
    """Top-1 drafts by the MTP layer without a cache, for rows of n[r] pairs (h [R, W, D],
    nxt [R, W], W > max(n) + k): each step appends the pair (its own output after the head
    norm, its draft) and recomputes the whole sequence."""
    main = merge(CFG, params)
    h, nxt, rows, drafts = np.array(h), np.array(nxt), np.arange(len(n)), []
    for i in range(k):
        g = np.asarray(_mtp_out(CFG, params, jnp.asarray(h), jnp.asarray(nxt)))[
            rows, np.add(n, i - 1)]
        drafts.append(np.asarray(jnp.argmax(main.logits(jnp.asarray(g)), -1)))
        h[rows, np.add(n, i)], nxt[rows, np.add(n, i)] = g, drafts[-1]
    return np.stack(drafts, 1)


_propose = jax.jit(propose, static_argnums=(0, 9), donate_argnames='pages')
K_MAX, WIDTH = 3, 12  # the shapes of every _propose call


def chain_case(params):
    """Each prompt with a first token: (tokens [3, 16], n [3]: each row's last position, main
    hidden states [3, 16, D], the token after each [3, 16], reference drafts [3, K_MAX])."""
    seqs = [p + [60 + i] for i, p in enumerate(PROMPTS)]
    n = np.array([len(s) - 1 for s in seqs])
    tokens = np.zeros((3, 16), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    h = np.asarray(hidden_states(CFG, params, jnp.asarray(tokens)))
    nxt = np.concatenate([tokens[:, 1:], np.zeros((3, 1), np.int32)], 1)
    ref = reference_drafts(params, h, nxt, n, K_MAX)
    return tokens, n, h, nxt, ref


def test_propose_equals_a_chain_without_cache(params):
    _, n, h, nxt, ref = chain_case(params)
    # The output at the last pair equals mtp_forward's, which test_paged_mtp checks.
    logits = np.asarray(mtp_forward(CFG, params, jnp.asarray(h), jnp.asarray(nxt)))
    assert (logits[np.arange(3), n - 1].argmax(-1) == ref[:, 0]).all()
    pages = init_mtp_pages(CFG, 1 + 3 * PAGES_PER_ROW, PAGE, jnp.float32)
    live = jnp.array([3], jnp.int32)
    # All but the last two pairs first (its chain of drafts writes where the second call
    # writes again), then the last two: as a step after verification would.
    head = n - 2
    _, pages = _propose(CFG, params, pages, jnp.asarray(h[:, :WIDTH]),
                        jnp.asarray(nxt[:, :WIDTH]), jnp.asarray(head, jnp.int32),
                        jnp.zeros(3, jnp.int32), tables(), live, K_MAX)
    idx = np.minimum(head[:, None] + np.arange(WIDTH), 15)  # 2 real pairs, then padding
    rows = np.arange(3)[:, None]
    drafts, _ = _propose(CFG, params, pages, jnp.asarray(h[rows, idx]),
                         jnp.asarray(nxt[rows, idx]), jnp.full((3,), 2, jnp.int32),
                         jnp.asarray(head, jnp.int32), tables(), live, K_MAX)
    assert np.asarray(drafts).tolist() == ref.tolist()


def test_redraft_after_plain_steps_equals_the_chain(params):
    """After plain decode steps (the MTP pairs' K/V written, no drafts), `redraft` drafts
    stale rows from their last pair as a chain without cache would; a row that is not stale
    writes no pair."""
    tokens, n, h, nxt, ref = chain_case(params)
    pages = init_mtp_pages(CFG, 1 + 3 * PAGES_PER_ROW, PAGE, jnp.float32)
    live, rows = jnp.array([3], jnp.int32), np.arange(3)
    _, pages = _propose(CFG, params, pages, jnp.asarray(h[:, :WIDTH]),
                        jnp.asarray(nxt[:, :WIDTH]), jnp.asarray(n - 1, jnp.int32),
                        jnp.zeros(3, jnp.int32), tables(), live, K_MAX)
    # The last plain step: only the K/V of the pair at n - 1.
    last = (jnp.asarray(h[rows, n - 1]), jnp.asarray(tokens[rows, n]))
    pages = jax.jit(write_mtp_kv, static_argnums=0)(
        CFG, params, *last, jnp.asarray(n - 1, jnp.int32), pages, jnp.asarray(n, jnp.int32),
        tables(), jnp.arange(4, dtype=jnp.int32), live)
    stale = jnp.array([True, False, True])
    table = np.asarray(tables())
    where = (table[1, np.arange(n[1]) // PAGE], np.arange(n[1]) % PAGE)  # row 1's positions
    before = np.asarray(pages.k[0])[:, where[0], where[1]]
    at = (table[0, (n[0] - 1) // PAGE], (n[0] - 1) % PAGE)  # row 0's last pair
    pair = np.asarray(pages.k[0])[:, at[0], at[1]]
    # Row 1's pair at n - 1 is replaced first: a write would put it back.
    pages = pages.replace(k=(pages.k[0].at[:, where[0][-1], where[1][-1]].set(0.0),),)
    drafts, pages = jax.jit(redraft, static_argnums=(0, 9))(
        CFG, params, pages, *last, jnp.asarray(n, jnp.int32), stale, tables(), live, K_MAX)
    assert np.asarray(drafts)[[0, 2]].tolist() == ref[[0, 2]].tolist()
    after = np.asarray(pages.k[0])[:, where[0], where[1]]
    np.testing.assert_array_equal(after[:, :-1], before[:, :-1])
    assert not after[:, -1].any()
    # A stale row's pair is written again, as the plain step wrote it (same position).
    np.testing.assert_allclose(np.asarray(pages.k[0])[:, at[0], at[1]], pair, rtol=0, atol=1e-6)


# --- verification ---

def test_targets_are_samples_distribution():
    """At position 0 the filtered logits are sample's own: the same key draws the same
    token from them, and greedy rows take sample's argmax."""
    R, V = 64, 50
    rng = np.random.RandomState(1)
    logits = jnp.asarray(rng.randn(R, V) * 3, jnp.float32)
    s = SamplingParams.make(R, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02,
                            repetition_penalty=1.2, presence_penalty=0.3,
                            frequency_penalty=0.2, logit_bias={4: 2.0})
    s = s.replace(seed=np.arange(R, dtype=np.uint32),
                  temperature=np.where(np.arange(R) % 4 == 0, 0.0, 0.8).astype(np.float32))
    counts = jnp.asarray(rng.poisson(0.3, (R, V)), jnp.int32)
    mask = jnp.asarray(rng.rand(R, V) < 0.1)
    index = jnp.asarray(rng.randint(0, 100, R), jnp.int32)
    s = jax.tree.map(jnp.asarray, s)
    greedy, filtered = jax.jit(_targets)(logits, s, counts, mask)
    drawn = jax.vmap(jax.random.categorical)(row_keys(s.seed, index), filtered)
    ours = np.where(np.asarray(s.temperature) > 0, np.asarray(drawn), np.asarray(greedy))
    assert ours.tolist() == np.asarray(sample(logits, s, counts, mask, index)[0]).tolist()


def test_verify_greedy_counts_stops_budget_and_width():
    V, k = 10, 3
    R = 5
    base = np.tile(np.linspace(1.0, 0.0, V, dtype=np.float32), (R, k + 1, 1))  # argmax 0
    drafts = np.zeros((R, k), np.int32)
    # Row 4 repeats token 0, which a frequency penalty of 0.3 per count pushes under token 1
    # (0.11 apart) once a draft 0 is counted: position 1 must reject it and emit 1, as
    # non-speculative sampling with that count would.
    s = SamplingParams.make(R).replace(
        frequency_penalty=np.array([0, 0, 0, 0, 0.3], np.float32))
    stop = np.full((R, 4), -1, np.int32)
    stop[0, 0] = 5
    drafts[0] = [0, 5, 0]  # the stop id, accepted at position 1 (its argmax, see below)
    base[0, 1, 5] = 2.0
    max_new = np.array([50, 3, 50, 50, 50], np.int32)  # row 1: 2 tokens left
    generated = np.array([1, 1, 1, 1, 1], np.int32)
    active = np.array([True, True, True, False, True])
    width = np.array([4, 4, 2, 4, 4], np.int32)  # row 2: only 2 positions computed
    out, counts, gen = jax.jit(verify)(
        jnp.asarray(base), jnp.asarray(drafts), jax.tree.map(jnp.asarray, s),
        jnp.zeros((R, V), jnp.int32), jnp.zeros((R, V), bool), jnp.asarray(generated),
        jnp.asarray(max_new), jnp.asarray(stop), jnp.asarray(active), jnp.asarray(width))
    valid = np.asarray(out.valid)
    assert valid.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                              [1, 1, 0, 0]]
    tokens = np.asarray(out.tokens)
    assert tokens[0, :2].tolist() == [0, 5] and tokens[4, :2].tolist() == [0, 1]
    assert np.asarray(out.done).tolist() == [True, True, False, False, False]
    assert np.asarray(out.accepted).tolist() == [3, 3, 2, 0, 1]
    assert np.asarray(gen).tolist() == [3, 3, 3, 1, 3]
    assert np.asarray(counts).sum(1).tolist() == [2, 2, 2, 0, 2]
    raw = jax.nn.log_softmax(jnp.asarray(base), -1)
    np.testing.assert_allclose(np.asarray(out.logprobs)[4, 1], raw[4, 1, 1], rtol=1e-6)


# A bigram "model" over a tiny vocabulary: the logits after token t are TABLE[t].
V_SMALL, K_SMALL, N_SAMPLES = 8, 2, 20000
TABLE = np.random.RandomState(3).randn(V_SMALL, V_SMALL).astype(np.float32) * 1.5
LAST, GENERATED = 3, 3  # every row continues after token 3, its 4th output
COUNTS = np.zeros(V_SMALL, np.int32)
COUNTS[[3, 5]] = [1, 2]
PROMPT_MASK = np.isin(np.arange(V_SMALL), [1, 2])


@jax.jit
def bigram_step(s, last, counts, generated, key, always_accept):
    """One speculative step of every row after `last`: drafts are the bigram argmax half the
    time and a uniform token otherwise. Returns (tokens, their count, the new last token,
    counts, generated)."""
    (N,), V, k = last.shape, V_SMALL, K_SMALL
    table = jnp.asarray(TABLE)
    guess = jax.random.randint(key, (N, k), 0, V)
    use_argmax = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (N, k))
    prev, drafts = last, []
    for j in range(k):
        prev = jnp.where(use_argmax[:, j], jnp.argmax(table[prev], -1), guess[:, j])
        drafts.append(prev)
    drafts = jnp.stack(drafts, 1).astype(jnp.int32)
    logits = table[jnp.concatenate([last[:, None], drafts], 1)]  # [N, k + 1, V]
    # The biased sampler: a target that takes every draft.
    forced = jnp.concatenate([100.0 * jax.nn.one_hot(drafts, V), logits[:, k:]], 1)
    logits = jnp.where(always_accept, forced, logits)
    out, counts, generated = verify(
        logits, drafts, s, counts, jnp.broadcast_to(PROMPT_MASK, (N, V)), generated,
        jnp.full((N,), 1000, jnp.int32), jnp.full((N, 1), -1, jnp.int32), jnp.ones((N,), bool))
    count = out.valid.sum(1)
    last = jnp.take_along_axis(out.tokens, (count - 1)[:, None], 1)[:, 0]
    return out.tokens, count, last, counts, generated


def first_two(s: SamplingParams, always_accept: bool) -> np.ndarray:
    """The first two tokens after LAST of N_SAMPLES rows (seeds 0..N-1), [N, 2], by one or
    two speculative steps."""
    N = N_SAMPLES
    last = jnp.full((N,), LAST, jnp.int32)
    counts = jnp.broadcast_to(jnp.asarray(COUNTS), (N, V_SMALL))
    generated = jnp.full((N,), GENERATED, jnp.int32)
    t1, c1, last, counts, generated = bigram_step(s, last, counts, generated,
                                                  jax.random.key(100), always_accept)
    t2, *_ = bigram_step(s, last, counts, generated, jax.random.key(101), always_accept)
    t1, c1, t2 = map(np.asarray, (t1, c1, t2))
    return np.stack([t1[:, 0], np.where(c1 >= 2, t1[:, 1], t2[:, 0])], 1)


@jax.jit
def sampling_probs(logits, s, counts, mask):
    """sample's distribution for rows [B, V], from sampling's own functions."""
    logits = apply_penalties(logits, s, counts, mask)
    cuts = jnp.any((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0))
    return jax.nn.softmax(jax.lax.cond(cuts, filter_logits, scale, logits, s), -1)


def exact_two(s: SamplingParams) -> np.ndarray:
    """P(first, second) [V, V] of non-speculative sampling: the second position penalised
    with the first counted."""
    V = V_SMALL
    rows = jax.tree.map(lambda x: x[:V + 1], s)  # the same settings on every row
    context = np.array([LAST] + list(range(V)))
    counts = np.stack([COUNTS] + [COUNTS + np.eye(V, dtype=np.int32)[a] for a in range(V)])
    probs = np.asarray(sampling_probs(jnp.asarray(TABLE[context]), rows, jnp.asarray(counts),
                                      jnp.broadcast_to(PROMPT_MASK, (V + 1, V))), np.float64)
    return probs[0][:, None] * probs[1:]


def chi_square_p(samples: np.ndarray, expected: np.ndarray) -> float:
    """p-value of the observed pairs against the expected cell probabilities; cells of
    expected count under 5 are pooled; a sample in an impossible cell is p = 0."""
    V = expected.shape[0]
    observed = np.bincount(samples[:, 0] * V + samples[:, 1], minlength=V * V)
    expected = expected.reshape(-1) * len(samples)
    if observed[expected == 0].any():
        return 0.0
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(jax.scipy.stats.chi2.sf(stat, len(obs) - 1))


CASES = {
    'plain': dict(temperature=1.0),
    'penalties_top_p': dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05,
                            repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.4, logit_bias={2: 1.0}),
}


@pytest.mark.parametrize('case', CASES)
def test_speculative_samples_match_sampling(case):
    s = SamplingParams.make(N_SAMPLES, **CASES[case]).replace(
        seed=np.arange(N_SAMPLES, dtype=np.uint32))
    s = jax.tree.map(jnp.asarray, s)
    expected = exact_two(s)
    assert chi_square_p(first_two(s, always_accept=False), expected) > 1e-3
    # Power: the same test tells a sampler that always accepts its drafts apart.
    assert chi_square_p(first_two(s, always_accept=True), expected) < 1e-6


# --- a speculative loop over the pages ---

_verify_forward = jax.jit(verify_forward, static_argnums=0, donate_argnames='pages')


def spec_decode(params, prompts, k, max_new=MAX_NEW, stop_ids=(), oracle=None,
                temperature=0.0, seed=0):
    """Decodes the prompts together: a prefill of all of them, the first token and drafts,
    then speculative steps until every row is done. `oracle(row, generated)`, if given,
    replaces the MTP's drafts before each step. Returns (tokens per row, the Verified of
    each step)."""
    R = len(prompts)
    V = CFG.vocab_size
    pages = init_pages(CFG, 1 + ROWS * PAGES_PER_ROW, PAGE, jnp.float32)
    mtp_pages = init_mtp_pages(CFG, 1 + ROWS * PAGES_PER_ROW, PAGE, jnp.float32)
    table, live = tables(), jnp.array([R], jnp.int32)
    tokens = np.zeros((ROWS, WIDTH), np.int32)
    lens = np.ones(ROWS, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], lens[i] = p, len(p)
    zeros = jnp.zeros(ROWS, jnp.int32)
    logits, hidden, _, pages = _verify_forward(CFG, params, pages, jnp.asarray(tokens), zeros,
                                               table, live, jnp.asarray(lens))
    last = np.asarray(logits)[np.arange(ROWS), lens - 1]
    mask = np.zeros((ROWS, V), bool)
    for i, p in enumerate(prompts):
        mask[i, p] = True
    s = SamplingParams.make(ROWS, temperature=temperature).replace(
        seed=(seed + np.arange(ROWS)).astype(np.uint32))
    s = jax.tree.map(jnp.asarray, s)
    first = np.asarray(sample(jnp.asarray(last), s, jnp.zeros((ROWS, V), jnp.int32),
                              jnp.asarray(mask), zeros)[0])
    nxt = np.concatenate([tokens[:, 1:], np.zeros((ROWS, 1), np.int32)], 1)
    nxt[np.arange(ROWS), lens - 1] = first
    # The first k of K_MAX drafts are what a chain of k makes: one compile for every k.
    drafts, mtp_pages = _propose(CFG, params, mtp_pages, hidden, jnp.asarray(nxt),
                                 jnp.asarray(lens), zeros, table, live, K_MAX)
    drafts = drafts[:, :k]
    stop = np.full((ROWS, 2), -1, np.int32)
    stop[:, :len(stop_ids)] = stop_ids
    counts = np.zeros((ROWS, V), np.int32)
    counts[np.arange(ROWS), first] = 1
    rows = SpecRows(
        tokens=jnp.asarray(first), lengths=jnp.asarray(lens), drafts=drafts,
        done=jnp.asarray(np.isin(first, stop_ids) | (max_new <= 1)),
        generated=jnp.ones(ROWS, jnp.int32), max_new=jnp.full(ROWS, max_new, jnp.int32),
        stop_ids=jnp.asarray(stop), counts=jnp.asarray(counts), prompt_mask=jnp.asarray(mask),
        sampling=s)
    out, steps = [[int(t)] for t in first[:R]], []
    while not np.asarray(rows.done)[:R].all():
        if oracle is not None:
            g = np.asarray(rows.generated)
            rows = rows.replace(drafts=jnp.asarray(
                [oracle(r, int(g[r])) for r in range(ROWS)], jnp.int32))
        pages, mtp_pages, rows, step = speculative_step(CFG, params, pages, mtp_pages, rows,
                                                        table, live)
        steps.append(jax.tree.map(np.asarray, step))
        for r in range(R):
            out[r] += step.tokens[r][step.valid[r]].tolist()
    return out, steps


def untouched(pool, table, row, stop):
    """Whether a row's positions 0..stop-1 still hold the marker 7 in pool [K, P, L, H]."""
    p = np.arange(stop)
    return bool((np.asarray(pool)[:, np.asarray(table)[row, p // PAGE], p % PAGE] == 7).all())


def test_rows_at_capacity_write_only_their_own_positions(params):
    """Positions past a row's page table (40 here) would land in its last page: the verify
    forward cuts such rows, the MTP chain sends them to the scratch page."""
    P = 1 + ROWS * PAGES_PER_ROW
    marked = lambda pages: jax.tree.map(lambda x: jnp.full_like(x, 7.0), pages)  # noqa: E731
    pages, table, live = marked(init_pages(CFG, P, PAGE, jnp.float32)), tables(), jnp.array([3])
    rng = np.random.RandomState(4)
    lengths = np.array([38, 0, 37], np.int32)  # uncut, 40.. would land on 36..
    _, _, num_logits, pages = _verify_forward(
        CFG, params, pages, jnp.asarray(rng.randint(0, 300, (3, WIDTH)), jnp.int32),
        jnp.asarray(lengths), table, live)
    assert np.asarray(num_logits).tolist() == [2, 12, 3]
    for pool in pages.k + pages.v:
        assert untouched(pool, table, 0, 38) and untouched(pool, table, 2, 37)
        assert not untouched(pool, table, 0, 40)
    mtp = marked(init_mtp_pages(CFG, P, PAGE, jnp.float32))
    start = np.array([36, 0, 38], np.int32)  # row 2's chain passes position 40
    _, mtp = _propose(CFG, params, mtp, jnp.asarray(rng.randn(3, WIDTH, 64), jnp.float32),
                      jnp.zeros((3, WIDTH), jnp.int32), jnp.array([2, 1, 1], jnp.int32),
                      jnp.asarray(start), table, live, K_MAX)
    for pool in mtp.k + mtp.v:
        assert untouched(pool, table, 0, 36) and untouched(pool, table, 2, 38)
        assert (np.asarray(pool)[:, 0] != 7).any()  # the scratch page took the rest


@pytest.mark.parametrize('k', [1, 2, 3])
def test_greedy_equals_generate_with_mtp_drafts(params, k):
    expected = generate(CFG, params, list(PROMPTS), MAX_NEW, stop_ids=())
    got, _ = spec_decode(params, PROMPTS, k)
    assert got == expected


@pytest.mark.parametrize('k', [2, 3])
def test_greedy_equals_generate_with_accepted_runs(params, k):
    """Drafts from the true continuation, one in five wrong: runs of accepted drafts, a
    stop id inside one (row 0) and the budget inside one (every row ends on it)."""
    free = generate(CFG, params, list(PROMPTS), MAX_NEW, stop_ids=())
    # Row 0 accepts all its drafts, so step s emits its outputs 1 + s(k+1) .. 1 + s(k+1) + k:
    # a stop id at output i is an accepted draft unless (i - 1) % (k + 1) == k. It must not
    # occur earlier in row 0, nor in the other rows.
    stop_at = next(i for i in range(2, MAX_NEW) if (i - 1) % (k + 1) != k
                   and free[0][i] not in free[0][:i] + free[1] + free[2])
    stop = free[0][stop_at]
    expected = generate(CFG, params, list(PROMPTS), MAX_NEW, stop_ids=(stop,))
    assert len(expected[0]) == stop_at + 1 and expected[1:] == free[1:]

    def oracle(r, g):
        if r >= len(PROMPTS):
            return [0] * k
        want = (free[r] + [0] * k)[g:g + k]
        # Row 0's drafts are right, so that its stop id is accepted with drafts after it.
        return [t if r == 0 or (g + j + r) % 5 != 2 else (t + 1) % CFG.vocab_size
                for j, t in enumerate(want)]

    got, steps = spec_decode(params, PROMPTS, k, stop_ids=(stop,), oracle=oracle)
    assert got == expected
    accepted = np.stack([s.accepted[:3] for s in steps])
    assert accepted.max() == k and (accepted == 0).any()  # full runs and rejections
    final = next(s for s in steps if s.valid[0].any() and s.done[0])
    emitted = int(final.valid[0].sum())
    assert final.tokens[0, emitted - 1] == stop and final.accepted[0] > emitted - 1
    # The budget cut an accepted run: a last step emitted less than its run and bonus.
    last = [next(s for s in steps if s.valid[r].any() and s.done[r]) for r in (1, 2)]
    assert any(s.valid[r].sum() < s.accepted[r] + 1 for s, r in zip(last, (1, 2)))


def test_sampled_run_is_reproducible(params):
    a, _ = spec_decode(params, PROMPTS, 2, temperature=1.0, seed=5)
    b, _ = spec_decode(params, PROMPTS, 2, temperature=1.0, seed=5)
    c, _ = spec_decode(params, PROMPTS, 2, temperature=1.0, seed=6)
    assert a == b and a != c
    assert all(len(t) == MAX_NEW for t in a)
