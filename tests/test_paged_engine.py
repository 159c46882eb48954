"""The paged engine: its forward equals the contiguous one, its tokens equal `generate` and
those of one sequence sampled alone over a contiguous cache, prefix caching changes no
output, every page comes back, a step runs only the active rows, a long prompt is computed
across steps while the others decode, and a pool too small for everyone preempts without
changing any output.

Every engine here has the same pool, page table and chunk shapes, so the compiled steps are
shared across tests (the tiny model still takes seconds to compile each)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import generate, hidden_states
from glmjax.cache import init_cache
from glmjax.demo import tiny_glm46
from glmjax.inference import decode, prefill
from glmjax.model import init_params
from glmjax.paged_inference import init_pages, paged_forward, pages_bytes
from glmjax.sampling import sample
from glmjax.serving.engine import SlotSettings
from glmjax.serving.paged_engine import PagedEngine, choose_budget, chunk_cost, chunk_stop

PAGE, CHUNK, MAX_SEQ, PAGES = 8, 12, 64, 48  # chunks of 12 are not aligned to pages of 8


@pytest.fixture(scope='module')
def model():
    cfg = tiny_glm46()
    return cfg, init_params(cfg, jnp.float32, seed=1)


def engine(model, **kw) -> PagedEngine:
    cfg, params = model
    kw = dict(max_batch=4, max_seq_len=MAX_SEQ, steps_per_call=3, page_size=PAGE,
              num_pages=PAGES, max_num_batched_tokens=CHUNK) | kw
    return PagedEngine(cfg, params, **kw)


def prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 1000, n).tolist() for n in lengths]


def collect(eng, out, settings, free_done=False):
    """Runs `generate` until every slot has its max_new tokens; appends them to out.
    free_done: frees each slot once it has them, as the orchestrator does."""
    while any(len(o) < s.max_new for o, s in zip(out, settings)):
        step = eng.generate()
        tokens, valid = np.asarray(step.tokens), np.asarray(step.valid)
        for slot in range(len(out)):
            out[slot] += tokens[slot][valid[slot]].tolist()
            if free_done and len(out[slot]) >= settings[slot].max_new:
                eng.free(slot)
    return [o[:s.max_new] for o, s in zip(out, settings)]


def run(eng, ps, settings, prefixes=None):
    """Every prompt in its own slot, all decoded together; returns the tokens per prompt.
    (insert returns no token: the first comes from generate.)"""
    out = [[] for _ in ps]
    for slot, p in enumerate(ps):
        prefix = eng.prefill(p)
        if prefixes is not None:
            prefixes.append(prefix)
        first = eng.insert(prefix, slot, settings[slot])
        assert not np.asarray(first.valid).any()
    return collect(eng, out, settings)


def greedy(n, max_new):
    return [SlotSettings(max_new=max_new, temperature=0.0)] * n


def test_paged_forward_equals_prefill_with_padding(model):
    """A ragged batch of three whole prompts (crossing pages, one of a single token), padded
    in tokens and rows with garbage: each row's last logits equal the contiguous prefill's
    at 1e-4, and padding writes no page."""
    cfg, params = model
    ps = prompts([13, 1, 20], seed=3)
    table = np.full((4, 4), 7, np.int32)  # padding row and unused entries: any page
    for r, page in enumerate([[1, 2], [3], [4, 5, 6]]):
        table[r, :len(page)] = page
    T = 40
    tokens = np.full(T, 999, np.int32)  # padding tokens: garbage ids and positions
    positions = np.full(T, 50, np.int32)
    cu = [0]
    for p in ps:
        tokens[cu[-1]:cu[-1] + len(p)] = p
        positions[cu[-1]:cu[-1] + len(p)] = np.arange(len(p))
        cu.append(cu[-1] + len(p))
    args = (np.array([13, 1, 20, 9], np.int32), table, np.array(cu + [5], np.int32),
            np.array([3], np.int32))
    logits, pages = paged_forward(cfg, params, tokens, positions,
                                  init_pages(cfg, 8, PAGE, jnp.float32), *args)
    # The shapes `generate` compiles for 4 prompts of up to 64 tokens and 10 new ones.
    batch = np.zeros((4, 64), np.int32)
    for r, p in enumerate(ps):
        batch[r, :len(p)] = p
    want, _ = prefill(cfg, params, jnp.asarray(batch), jnp.asarray([13, 1, 20, 1]),
                      init_cache(cfg, 4, 80, jnp.float32))
    np.testing.assert_allclose(logits[:3], want[:3], atol=1e-4, rtol=0)
    assert not np.asarray(pages.k[0][:, 7]).any()


def test_greedy_equals_generate_and_one_row_runs_alone(model):
    """Mixed lengths crossing page boundaries, chunked prefill not aligned to pages: the
    same tokens as `generate`. As sequences leave, the step's rows shrink to the bucket of
    those left: one sequence runs a 1-row step."""
    cfg, params = model
    ps = prompts([40, 7, 33, 16])
    want = generate(cfg, params, ps, 10, stop_ids=())
    eng = engine(model)
    assert eng.row_buckets == (1, 2, 4) and eng.token_buckets == (CHUNK,)
    assert run(eng, ps, greedy(4, 10)) == want
    assert eng.last_rows == 4
    rows = []
    for slot in (0, 1, 2):
        eng.free(slot)
        eng.generate()
        rows.append(eng.last_rows)
    assert rows == [4, 2, 1]
    eng.free(3)
    assert eng.manager.pool.num_free == eng.manager.pool.allocatable


def test_prefix_cache_shares_pages_and_changes_no_output(model):
    """Prompts sharing a 21-token prefix: with the cache, once the first is computed the
    others reuse its 2 full pages (refcounts show the sharing) and compute only the rest; the
    tokens equal a run without the cache and `generate`."""
    cfg, params = model
    shared = prompts([21], seed=5)[0]
    ps = [shared + tail for tail in prompts([5, 14, 3, 19], seed=6)]
    want = generate(cfg, params, ps, 10, stop_ids=())  # the shapes of the test above
    off = engine(model, prefix_caching=False)
    offs = []
    assert run(off, ps, greedy(4, 10), offs) == want
    assert [p.cached_tokens for p in offs] == [0, 0, 0, 0]
    on = engine(model)
    # The first fills the cache; the four take its pages at prefill.
    assert run(on, ps[:1], greedy(1, 10)) == want[:1]
    on.free(0)
    ons = []
    assert run(on, ps, greedy(4, 10), ons) == want
    assert [p.cached_tokens for p in ons] == [24, 16, 16, 16]  # the first: its 3 full pages
    tables = [on.manager.page_table(p.seq_id) for p in ons]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2] == tables[3][:2]
    assert [on.manager.pool.refcount(p) for p in tables[0][:3]] == [4, 4, 1]
    stats = on.manager.metrics()
    assert stats['prefix_cache_hits'] == 72
    assert stats['prefix_cache_queries'] == len(ps[0]) + sum(map(len, ps))
    for slot in range(4):
        on.free(slot)
    # Full prompt pages stay cached (evictable, so counted free) for the next request.
    assert on.manager.pool.num_free == on.manager.pool.allocatable
    again = on.prefill(ps[1])
    assert again.cached_tokens == 32
    on.manager.finish(again.seq_id)


def test_prompts_admitted_together_compute_their_shared_pages_once(model):
    """The same four prompts admitted together on a cold cache: while the first computes
    the shared prefix's two full pages the others wait, then take them; the tokens equal
    `generate`, and their usage counts the 16 cached tokens each."""
    cfg, params = model
    shared = prompts([21], seed=5)[0]
    ps = [shared + tail for tail in prompts([5, 14, 3, 19], seed=6)]
    want = generate(cfg, params, ps, 10, stop_ids=())
    eng = engine(model)
    plans, chunks = [], eng._chunks
    eng._chunks = lambda *args: plans.append(chunks(*args)) or plans[-1]
    prefixes = []
    assert run(eng, ps, greedy(4, 10), prefixes) == want
    assert [p.cached_tokens for p in prefixes] == [0, 0, 0, 0]  # as admitted
    assert [eng.cached_tokens(slot) for slot in range(4)] == [0, 16, 16, 16]
    computed = [(s, start, stop) for plan in plans for s, start, stop in plan]
    assert sum(stop - start for _, start, stop in computed) == sum(map(len, ps)) - 48
    # Nothing else is computed until slot 0 has written both shared pages.
    assert [c for c in computed if c[0] == 0][:2] == [(0, 0, 12), (0, 12, 24)]
    assert all(s == 0 for s, _, _ in computed[:2])
    assert eng.manager.metrics()['prefix_cache_hits'] == 48
    for slot in range(4):
        eng.free(slot)
    assert eng.manager.pool.num_free == eng.manager.pool.allocatable


def test_the_next_turn_finds_the_answers_pages_cached(model):
    """A conversation's next turn resends the answer: the pages the answer filled while it
    was decoded are cached (those fetched by the time the slot is freed), and the next
    turn's tokens equal `generate`'s."""
    cfg, params = model
    p, tail = prompts([13, 6], seed=8)
    eng = engine(model)
    answer = run(eng, [p], greedy(1, 30))[0]
    eng.free(0)
    turn, prefixes = p + answer + tail, []
    got = run(eng, [turn], greedy(1, 10), prefixes)
    assert got == generate(cfg, params, [turn], 10, stop_ids=())
    # The answer's last call (its 2 last tokens) was unread when the slot was freed: 28
    # fetched, the K/V of 13 + 28 - 1 = 40 tokens written, 5 full pages (the prompt one).
    assert prefixes[0].cached_tokens == 40
    eng.free(0)


def test_every_page_returns_after_random_requests(model):
    """Random requests with shared prefixes, frees at random times (some before they are
    done, as cancellations): in the end every page is free, and the cached ones count."""
    eng = engine(model)
    rng = np.random.RandomState(7)
    system = prompts([17], seed=8)[0]
    pool = eng.manager.pool
    for _ in range(10):
        free = [s for s in range(4) if not eng._in_use[s]]
        for slot in free[:rng.randint(0, len(free) + 1)]:
            tail = rng.randint(0, 1000, rng.randint(1, 20)).tolist()
            p = (system + tail) if rng.rand() < 0.6 else tail
            eng.insert(eng.prefill(p), slot, SlotSettings(max_new=int(rng.randint(1, 12))))
        eng.generate()  # with no sequence left: an empty output, no device call
        for slot in range(4):
            if eng._in_use[slot] and rng.rand() < 0.4:
                eng.free(slot)
        assert pool.num_used == sum(pool.refcount(p) > 0 for p in range(1, pool.num_pages))
    for slot in range(4):
        eng.free(slot)
    assert pool.num_free == pool.allocatable
    assert eng.manager.stats.prefix_cache_hits > 0 and pool.num_cached > 0


_prefill = jax.jit(prefill, static_argnums=0)
_decode = jax.jit(decode, static_argnums=0)


def reference(model, prompt: list[int], s: SlotSettings) -> list[int]:
    """One sequence alone over a contiguous cache, sampled as a request is (keys from its
    seed and output index, penalties from its counts and prompt): what the engine must give."""
    cfg, params = model
    V = cfg.vocab_size
    tokens = np.zeros((1, MAX_SEQ), np.int32)
    tokens[0, :len(prompt)] = prompt
    logits, cache = _prefill(cfg, params, tokens, np.array([len(prompt)], np.int32),
                             init_cache(cfg, 1, 2 * MAX_SEQ, jnp.float32))
    counts, seen = np.zeros((1, V), np.int32), np.zeros((1, V), bool)
    seen[0, prompt] = True
    out = []
    for i in range(s.max_new):
        token = int(sample(logits, s.sampling(), counts, seen, np.array([i], np.int32))[0][0])
        out.append(token)
        counts[0, token] += 1
        logits, cache = _decode(cfg, params, np.array([token], np.int32), cache)
    return out


def test_sampling_equals_one_sequence_alone(model):
    """Temperature, top_k/top_p, penalties, logit_bias and seeds, three sequences in one
    batch: each gets the tokens it gets alone over a contiguous cache (one sampler, keys
    from seed and output index)."""
    ps = prompts([9, 14, 3], seed=2)
    settings = [
        SlotSettings(max_new=8, temperature=0.9, top_k=50, seed=11, repetition_penalty=1.3,
                     logit_bias=((5, 4.0), (17, -100.0))),
        SlotSettings(max_new=8, temperature=1.1, top_p=0.8, seed=12, presence_penalty=0.7,
                     frequency_penalty=0.4),
        SlotSettings(max_new=8, temperature=0.0, repetition_penalty=1.5,
                     logit_bias=((3, 2.0),)),
    ]
    want = [reference(model, p, s) for p, s in zip(ps, settings)]
    assert run(engine(model), ps, settings) == want
    assert len({tuple(w) for w in want}) == 3 and want[0] != want[1]


def test_a_pool_too_small_preempts_and_changes_no_output(model):
    """20 usable pages of 8 tokens for 4 sequences growing to 48-64 tokens (29 pages): the
    newest are preempted and recomputed, every sequence ends with the tokens of an
    unconstrained run, sampled ones (penalties, seeds) included, and every page returns."""
    cfg, params = model
    ps = prompts([34, 25, 33, 18], seed=9)
    settings = [SlotSettings(max_new=30, temperature=0.0),
                SlotSettings(max_new=30, temperature=0.9, top_p=0.9, seed=3,
                             frequency_penalty=0.5),
                SlotSettings(max_new=30, temperature=0.0, repetition_penalty=1.4),
                SlotSettings(max_new=30, temperature=1.0, seed=5)]
    want = run(engine(model), ps, settings)
    small = engine(model, num_pages=21)
    resumed, plan = {}, small._chunks

    def chunks(*args):  # where each slot's first recomputation after decoding starts
        out = plan(*args)
        for s, start, _ in out:
            if not small._filling[s].first:
                resumed.setdefault(s, start)
        return out

    small._chunks = chunks
    for slot, p in enumerate(ps):
        small.insert(small.prefill(p), slot, settings[slot])
    assert collect(small, [[] for _ in ps], settings, free_done=True) == want
    assert small.manager.stats.preemptions > 0
    assert small.manager.pool.num_free == small.manager.pool.allocatable
    # A preempted sequence resumes past its prompt: its generated pages were cached.
    assert any(start > len(ps[s]) for s, start in resumed.items()), resumed


def test_a_long_prompt_is_computed_while_the_others_decode(model):
    """A 60-token prompt with steps of 12 tokens arrives beside a decoding sequence: it takes
    five mixed steps, in each of which the other sequence gets its next token; the tokens of
    both equal `generate`."""
    cfg, params = model
    ps = prompts([9, 60], seed=12)
    eng = engine(model)
    out = [[], []]
    eng.insert(eng.prefill(ps[0]), 0, SlotSettings(max_new=20, temperature=0.0))
    out[0] += np.asarray(eng.generate().tokens)[0, :1].tolist()  # its prompt and first token
    eng.insert(eng.prefill(ps[1]), 1, SlotSettings(max_new=4, temperature=0.0))
    per_step = []
    while eng._filling[1] is not None:
        step = eng.generate()
        valid = np.asarray(step.valid)
        per_step.append(valid.sum(axis=1)[:2].tolist())
        for slot in range(2):
            out[slot] += np.asarray(step.tokens)[slot][valid[slot]].tolist()
        assert (eng.last_rows, eng.last_tokens) == (5, CHUNK)  # a row per slot, and one
    # 11 prompt tokens per step beside the decode token: 6 steps, the last with the first
    # token of the new prompt.
    assert per_step == [[1, 0]] * 5 + [[1, 1]]
    got = collect(eng, out, [SlotSettings(max_new=20), SlotSettings(max_new=4)])
    assert got == [generate(cfg, params, [ps[0]], 20, stop_ids=())[0],
                   generate(cfg, params, [ps[1]], 4, stop_ids=())[0]]


def test_warmup_compiles_the_buckets_and_leaves_nothing(model):
    """Warm-up runs every mixed step (1 token bucket), decode call (3 row buckets) and
    embedding step, the shapes above: nothing new to compile here, and resets: every page
    free, nothing cached, no slot in use."""
    from glmjax.serving import paged_engine
    eng = engine(model)
    calls = []
    eng.warmup(lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    pool = eng.manager.pool
    assert pool.num_free == pool.allocatable and pool.num_cached == 0
    assert eng._in_use == [False] * 4
    fns = (paged_engine._mixed_forward, paged_engine._sum_rows)
    before = [f._cache_size() for f in fns]
    eng.embed(prompts([3, 40]))
    assert [f._cache_size() for f in fns] == before


def test_after_warmup_the_first_steps_compile_nothing(model):
    """The pool `reset` makes is the same input to each program as the pool a step returns:
    after warm-up, a first prompt in a token bucket other than the smallest, and its decode
    calls, compile nothing."""
    from glmjax.serving import paged_engine
    eng = engine(model, num_pages=PAGES - 1, max_num_batched_tokens=32)  # a pool of its own
    eng.warmup()
    assert eng.token_buckets == (16, 32)
    fns = (paged_engine._mixed_forward, paged_engine._mixed_sample, paged_engine._generate)
    before = [f._cache_size() for f in fns]
    settings = [SlotSettings(max_new=7)]
    eng.insert(eng.prefill(prompts([30])[0]), 0, settings[0])
    collect(eng, [[]], settings)
    assert [f._cache_size() for f in fns] == before


def test_choose_budget_takes_the_largest_step_no_dearer_than_a_decode_call():
    timed = []

    def cost(T):
        timed.append(T)
        return T / 64

    assert choose_budget(1.0, cost, (16, 32, 64, 128, 256)) == 64
    assert timed == [32, 64, 128]  # the first is taken untimed; a dearer step ends the search
    assert choose_budget(0.1, lambda T: 1.0, (16, 32)) == 16  # the first, whatever it costs
    assert choose_budget(9.0, lambda T: 1.0, (16, 32)) == 32


def test_warmup_measures_the_budget_when_none_is_given(model, monkeypatch):
    """Made without a budget, the engine times a decode call of its 4 rows and mixed steps
    of 32 and 64 tokens, each beside a decode call (each run for real, on the scratch page;
    costs faked here: 1 s and T / 32 s), stops at 64, the first dearer than the decode call,
    and takes 32; it times that step at the deepest context to count a prompt token's
    context; then it computes prompts in steps of up to 32 tokens (fewer deeper in a prompt
    while a sequence decodes), with the same tokens as `generate`, and warm-up left nothing
    in the pool or the decode state."""
    cfg, params = model
    timed = []

    def seconds(self, runs):
        # Each run's output, and where its rows are after it: a decode call's at position 0
        # (the mixed step before it left 32 or 64 in row 0; done rows stay where they are).
        timed.append([(name, jax.block_until_ready(run()) is not None,
                       int(np.asarray(self.state.lengths).max())) for name, run in runs.items()])
        # The step of 32 tokens at context 32 (the deepest: max_seq_len 64) costs twice the
        # same step at context 0: a prompt token at context c counts 1 + c / 32.
        cost = {'decode': 1.0, 'at 0': 1.0, 'deep': 2.0}
        return {name: cost.get(name) or int(name.split()[1]) / 32 for name in runs}

    monkeypatch.setattr(PagedEngine, '_seconds', seconds)
    eng = engine(model, max_num_batched_tokens=None)
    assert eng.max_num_batched_tokens == 16 and eng.token_buckets == (16,)  # until measured
    calls = []
    eng.warmup(lambda done, total: calls.append((done, total)))
    # Each step beside a decode call, timed in turn; then the budget's step at context 0
    # and at the deepest context.
    assert timed == [[('decode', True, 0)], [('decode', True, 0), ('mixed 32', True, 32)],
                     [('decode', True, 0), ('mixed 64', True, 64)],
                     [('decode', True, 0), ('at 0', True, 32), ('deep', True, 64)]]
    assert eng.max_num_batched_tokens == 32 and eng.token_buckets == (16, 32)
    assert eng.budget_timings == {'decode': 1.0, 'mixed 32': 1.0, 'mixed 64': 2.0,
                                  'mixed 32 at 32': 2.0}
    assert eng.budget_ratios == {32: 1.0, 64: 2.0} and eng.context_tokens == 32.0
    from glmjax.serving.server import budget_line
    assert budget_line(eng) == (
        '--max_num_batched_tokens 32, measured: a decode call of 4 sequences 1000.0 ms; steps '
        'of 32 / 64 tokens 1000.0 / 2000.0 ms (1.00 / 2.00 of a decode call timed beside '
        'each); a prompt token at context c counts 1 + c / 32 tokens (a step of 32 tokens at '
        'context 32: 2000.0 ms)')
    # A chunk from position 32 takes half the tokens of one from 0, and counts them twice;
    # deeper, at least the smallest bucket's 16 tokens.
    assert [chunk_stop(start, 32, 32.0) for start in (0, 32, 96)] == [32, 48, 112]
    assert chunk_cost(32, 48, 32.0) == 32 and chunk_cost(0, 20, 32.0) == 20
    assert chunk_stop(96, 32, None) == 128 and chunk_cost(32, 48, None) == 16
    assert chunk_stop(40, 32, 0.5) == 56 and chunk_cost(40, 56, 0.5) == 1296  # a tiny one
    chunks = []
    plan = eng._chunks
    monkeypatch.setattr(eng, '_chunks', lambda *a: chunks.append(plan(*a)) or chunks[-1])
    # 3 sizes (16 .. 64: up to one whole prompt) and 3 row buckets.
    assert calls[-1] == (6, 6) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert eng.manager.pool.num_free == eng.manager.pool.allocatable
    ps = prompts([40, 7, 33, 16], seed=3)
    assert run(eng, ps, greedy(4, 10)) == generate(cfg, params, ps, 10, stop_ids=())
    # (slot, start, stop) per mixed step. Until a sequence decodes, tokens count 1 each
    # (the first two steps); in the third, two decode, and the 16 tokens from 17 count 25
    # of the 30 left, so slot 3 gets 5 (14 if tokens counted 1).
    assert [c for c in chunks if c] == [[(0, 0, 32)], [(0, 32, 40), (1, 0, 7), (2, 0, 17)],
                                        [(2, 17, 33), (3, 0, 5)], [(3, 5, 16)]]


def test_seconds_times_its_runs_in_turn_and_keeps_each_ones_fastest():
    """So that a slow phase of the machine reaches each run alike: a first call of each,
    then BUDGET_TIMINGS rounds of one call each, in order."""
    import glmjax.serving.paged_engine as paged_engine
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ('a', 'b')}
    got = PagedEngine._seconds(None, runs)
    assert calls == ['a', 'b'] * (1 + paged_engine.BUDGET_TIMINGS)
    assert list(got) == ['a', 'b'] and all(0 < t < 1 for t in got.values())


def test_embed_is_the_normalised_mean_of_the_hidden_states(model, monkeypatch):
    """Computed as prompts are: packed into mixed steps of at most max_num_batched_tokens
    (and max_batch rows), over pages of their own, whatever their length; the pages are free
    again after."""
    from glmjax.serving import paged_engine
    cfg, params = model
    ps = prompts([5, 30, 1, 17, 40, MAX_SEQ])
    h = [np.asarray(hidden_states(cfg, params, jnp.asarray([p])))[0].mean(0) for p in ps]
    steps, forward = [], paged_engine._mixed_forward

    def spy(*args):
        cu_q_lens, num_seqs = np.asarray(args[8]), np.asarray(args[11])
        steps.append((args[6].shape[0], int(cu_q_lens[num_seqs[0]])))  # padded, real tokens
        return forward(*args)

    monkeypatch.setattr(paged_engine, '_mixed_forward', spy)
    eng = engine(model)
    np.testing.assert_allclose(eng.embed(ps), [v / np.linalg.norm(v) for v in h], atol=1e-5)
    assert {padded for padded, _ in steps} == {CHUNK}
    assert sum(real for _, real in steps) == sum(map(len, ps))
    # Every step full but the last: an input's chunk begins where the one before ends
    # (one input per step would take 17).
    assert len(steps) == -(-sum(map(len, ps)) // CHUNK)
    assert eng.manager.pool.num_free == eng.manager.pool.allocatable


def test_an_embedding_preempts_the_newest_sequence_when_the_pool_is_short(model):
    """The pages an embedding input needs come out of the pool; while it is short, running
    sequences are preempted and later recomputed, their outputs unchanged."""
    cfg, params = model
    ps = prompts([20, 9], seed=3)
    settings = [SlotSettings(max_new=12), SlotSettings(max_new=12)]
    want = [[], []]
    roomy = engine(model)
    for slot, (p, s) in enumerate(zip(ps, settings)):
        roomy.insert(roomy.prefill(p), slot, s)
    collect(roomy, want, settings)
    long = prompts([MAX_SEQ], seed=4)
    alone = roomy.embed(long)
    small = engine(model, num_pages=1 + MAX_SEQ // PAGE + 1)  # the input's pages and one more
    for slot, (p, s) in enumerate(zip(ps, settings)):
        small.insert(small.prefill(p), slot, s)
    got = [[], []]
    for _ in range(2):
        step = small.generate()
        for slot in range(2):
            got[slot] += np.asarray(step.tokens)[slot][np.asarray(step.valid)[slot]].tolist()
    np.testing.assert_allclose(small.embed(long), alone, atol=1e-6)
    assert small.manager.stats.preemptions >= 1
    collect(small, got, settings)
    assert got == want


def test_an_embedding_call_is_computed_in_the_steps_of_the_decoding_streams(model,
                                                                           monkeypatch):
    """embed_begin: the inputs' chunks ride in the same mixed steps as the decode rows, so
    the streams get a token every step while it is computed; their tokens and the vectors
    are those of each alone. embed_cancel: a call dropped half way computes nothing more
    and gives its pages back."""
    from glmjax.serving import paged_engine
    ps, settings = prompts([9, 20], seed=7), [SlotSettings(max_new=30)] * 2
    want = [[], []]
    alone = engine(model)
    for slot, (p, s) in enumerate(zip(ps, settings)):
        alone.insert(alone.prefill(p), slot, s)
    collect(alone, want, settings)
    inputs = prompts([MAX_SEQ, 30], seed=8)
    vectors = alone.embed(inputs)
    steps, mixed = [], paged_engine.PagedEngine._mixed

    def spy(self, decoding, chunks, embeds, masks):
        steps.append((len(decoding), sum(stop - start for _, _, start, stop in embeds)))
        return mixed(self, decoding, chunks, embeds, masks)

    monkeypatch.setattr(paged_engine.PagedEngine, '_mixed', spy)
    eng = engine(model)
    for slot, (p, s) in enumerate(zip(ps, settings)):
        eng.insert(eng.prefill(p), slot, s)
    got, results = [[], []], []
    for _ in range(4):  # both prompts computed: the streams decode
        step = eng.generate()
        for slot in range(2):
            got[slot] += np.asarray(step.tokens)[slot][np.asarray(step.valid)[slot]].tolist()
    assert all(got) and not eng.embedding_work
    steps.clear()
    key = eng.embed_begin(inputs)
    dropped = eng.embed_begin(inputs)
    for call in range(30):
        step = eng.generate()
        for slot in range(2):
            got[slot] += np.asarray(step.tokens)[slot][np.asarray(step.valid)[slot]].tolist()
        if call == 11:  # the dropped call has run 26 of its 94 tokens
            eng.embed_cancel(dropped)
            assert eng.manager.pool.num_free == eng.manager.pool.allocatable - sum(
                len(eng.manager.page_table(eng._slot_seq[s])) for s in range(2))
        results += eng.embed_results()
    results += eng.embed_results(block=True)
    assert got == want
    assert [k for k, _ in results] == [key]
    np.testing.assert_allclose(results[0][1], vectors, atol=1e-6)
    # 10 tokens a step beside the two decode rows: the first call's 94 in 10 steps (its last
    # shared with the dropped call's first 6), then the dropped call's 2 more, and no more.
    assert [s for s in steps if s[1]] == [(2, 10)] * 12
    assert not eng.embedding_work and eng.embed_results(block=True) == []


@pytest.mark.parametrize('axes, rules, heads', [
    ({'expert': 4, 'tensor': 2}, 'decode_ep', 'tensor'), ({'data': 2, 'expert': 4}, 'decode_ep',
                                                          None),
    ({'expert': 2, 'tensor': 4}, 'ep_tp', 'expert')])
def test_on_a_mesh_greedy_equals_generate(model, axes, rules, heads):
    from glmjax import sharding
    cfg, params = model
    mesh = sharding.make_mesh(axes)
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh, rules))
    eng = PagedEngine(cfg, sharded, max_batch=4, max_seq_len=MAX_SEQ, steps_per_call=3,
                      page_size=PAGE, num_pages=PAGES, max_num_batched_tokens=CHUNK,
                      mesh=mesh, rules=rules)
    ps = prompts([40, 7, 33, 16], seed=5)
    assert run(eng, ps, greedy(len(ps), 12)) == generate(cfg, params, ps, 12, stop_ids=())
    k = eng.pages.k[0]
    assert k.sharding.is_equivalent_to(sharding.pages_shardings(cfg, mesh, k, rules), k.ndim)
    # kv heads split over the axis the rules give them (the kernels run per device over it).
    assert eng.heads_axis == heads and eng.pages.heads_axis == heads
    split = cfg.num_key_value_heads // (axes[heads] if heads else 1)
    assert {s.data.shape[0] for s in k.addressable_shards} == {split}
    inputs = prompts([3, 40, 17, 1, 9], seed=6)
    np.testing.assert_allclose(eng.embed(inputs), engine(model).embed(inputs), atol=1e-5)


def test_the_pool_fills_the_devices_memory_where_they_report_it(model, monkeypatch):
    """Without num_pages or kv_cache_bytes, on devices that report their memory (GPU, TPU):
    as many pages as fit in 90% of a device's memory less what it uses and the largest
    step's temporaries (`_temporaries`, here made up), counting a page as the shard a device
    holds (half of it with the kv heads over 2 devices) and the MTP layer's pages with
    speculation; too little memory is an error with the numbers."""
    from glmjax import sharding
    from glmjax.serving import paged_engine
    cfg, params = model
    one = jax.eval_shape(lambda: init_pages(cfg, 1, PAGE, jnp.float32))
    page = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(one))
    used, temps = 12_345, 10 * page
    limit = int((37.5 * page + used + temps) / paged_engine.KV_MEMORY_FRACTION) + 1
    memory = {'limit': limit}
    monkeypatch.setattr(paged_engine, 'device_memory',
                        lambda devices: [(memory['limit'], used)] * len(devices))
    monkeypatch.setattr(PagedEngine, '_temporaries', lambda self: temps)
    plain = PagedEngine(cfg, params, 2, MAX_SEQ, page_size=PAGE)
    assert (plain.num_pages, plain.temp_bytes) == (37, temps)
    from glmjax.serving.server import pool_line
    assert pool_line(plain) == (f'KV pages: 36 of {PAGE} tokens ({36 * PAGE} tokens), 90% of '
                                f'each device less what is in use and {temps / 1e9:.2f} GB '
                                "for the largest step's temporaries")
    # With speculation one layer's pages more per page: 37.5 x L / (L + 1) of them.
    L = cfg.num_hidden_layers
    assert PagedEngine(cfg, params, 2, MAX_SEQ, page_size=PAGE, speculative_tokens=1
                       ).num_pages == int(37.5 * L / (L + 1))
    mesh = sharding.make_mesh({'expert': 2, 'tensor': 4})
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh, 'ep_tp'))
    split = PagedEngine(cfg, sharded, 2, MAX_SEQ, page_size=PAGE, mesh=mesh, rules='ep_tp')
    assert split.num_pages == 75  # each device holds 1 of the 2 kv heads of every page
    memory['limit'] = int((used + temps) / paged_engine.KV_MEMORY_FRACTION) + page
    with pytest.raises(ValueError, match=f'no room for KV pages: 90% of a device.s memory '
                                         f'less the 12,345 bytes in use and the {temps:,} '
                                         'bytes of the largest step.s temporaries leaves'):
        PagedEngine(cfg, params, 2, MAX_SEQ, page_size=PAGE)
    # Given a size, memory is not asked.
    assert PagedEngine(cfg, params, 2, MAX_SEQ, page_size=PAGE, num_pages=9).num_pages == 9


def test_the_pool_leaves_room_for_the_largest_programs_temporaries(monkeypatch):
    """The temporaries the pool leaves room for are those XLA compiles for the engine's
    largest programs, extrapolated from a few layers to the model's depth (no less than a
    compile of every layer gives, and not much more); at least the forward of the largest
    step (the most prompt tokens warm-up may choose), as glmjax-plan compiles it."""
    import dataclasses

    from glmjax.serving import paged_engine
    from glmjax.sharding import plan
    cfg = dataclasses.replace(tiny_glm46(), first_k_dense_replace=1,
                              num_hidden_layers=6)  # 2, 3 and 4 layers compiled
    params = init_params(cfg, jnp.float32, seed=2)
    monkeypatch.setattr(paged_engine, 'device_memory', lambda devices: [(10 ** 10, 0)])
    # One sequence: the step of 1,024 prompt tokens needs more than a decode call.
    eng = PagedEngine(cfg, params, 1, 1024, page_size=PAGE, max_num_batched_tokens=None)
    every_layer = paged_engine.full_depth
    monkeypatch.setattr(paged_engine, 'full_depth', lambda cfg, sizes_at: every_layer(
        dataclasses.replace(cfg, first_k_dense_replace=cfg.num_hidden_layers), sizes_at))
    every = eng._temporaries()
    assert every <= eng.temp_bytes <= 1.05 * every  # at most a little more than needed
    step = plan.compile_paged_step(cfg, eng.layout.mesh, params, jnp.float32, None, 1024, 1,
                                   1024, PAGE)
    assert eng.temp_bytes >= step['temp'] + step['outputs']
    assert eng.num_pages == int(0.9 * 10 ** 10 - eng.temp_bytes) // pages_bytes(
        cfg, 1, PAGE, jnp.float32)
