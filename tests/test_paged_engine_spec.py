"""MTP speculative decoding in the paged engine, on the trained demo model (random weights
would accept no draft): greedy output equals decoding without speculation token for token
(k = 1 and 3, prompts across page boundaries computed in chunks beside decoding rows, a stop
id inside an accepted run, a pool so small that sequences are preempted, a mesh), sampled
output is reproducible from its seed, drafts are accepted and counted as vLLM counts them,
the pages reserved follow what was emitted, and a checkpoint without an MTP layer is refused.
Through the server, the streamed text and stop strings are those of the plain engine."""

import json
import re

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import sharding
from glmjax.config import GlmConfig
from glmjax.hf import load_hf
from glmjax.serving.engine import SlotSettings
from glmjax.serving.kv_pages import pages_for
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.server import DEMO_MODEL, start_http
from glmjax.serving.service import GlmServer
from glmjax.serving.tokenizer import Tokenizer

PAGE, MAX_SEQ, PAGES, CHUNK, STEPS, NEW = 8, 128, 64, 16, 3, 30
TEXTS = ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
         'import os\nimport sys\n\n\ndef main',
         'class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self):\n',
         'for i in range(10):\n')


@pytest.fixture(scope='module')
def demo():
    cfg = GlmConfig.from_hf(DEMO_MODEL)
    return cfg, load_hf(DEMO_MODEL, cfg, jnp.float32), Tokenizer.from_dir(DEMO_MODEL)


@pytest.fixture(scope='module')
def prompts(demo):
    return [demo[2].encode(t) for t in TEXTS]


def engine(demo, k, **kw):
    cfg, params, _ = demo
    kw = dict(max_batch=4, max_seq_len=MAX_SEQ, steps_per_call=STEPS, page_size=PAGE,
              num_pages=PAGES, max_num_batched_tokens=CHUNK, speculative_tokens=k) | kw
    return PagedEngine(cfg, params, **kw)


def decode(eng, ps, settings, stagger=False):
    """Each prompt in its own slot; stagger: the next one arrives after each call, so that
    prompts are computed beside decoding rows. Runs until every slot is done on the device,
    freeing none; returns the tokens per slot."""
    out = [[] for _ in ps]
    waiting, done = list(enumerate(ps)), False
    while waiting or not done:
        for slot, p in waiting[:1] if stagger else waiting:
            eng.insert(eng.prefill(p), slot, settings[slot])
        waiting = waiting[1:] if stagger else []
        step = eng.generate()
        tokens, valid = np.asarray(step.tokens), np.asarray(step.valid)
        for slot in range(len(ps)):
            out[slot] += tokens[slot][valid[slot]].tolist()
        done = bool(np.asarray(step.done)[:len(ps)].all())
    eng._fetch(keep=0)
    return out


def greedy(n, stop_ids=()):
    return [SlotSettings(max_new=NEW, temperature=0.0, stop_ids=stop_ids)] * n


@pytest.fixture(scope='module')
def plain(demo, prompts):
    return decode(engine(demo, 0), prompts, greedy(len(prompts)))


@pytest.mark.parametrize('k', [1, 3])
def test_greedy_equals_plain_decoding_and_drafts_are_accepted(demo, prompts, plain, k):
    eng = engine(demo, k)
    assert decode(eng, prompts, greedy(len(prompts)), stagger=True) == plain
    m = eng.metrics()
    assert m['spec_decode_num_draft_tokens'] == k * m['spec_decode_num_drafts'] > 0
    per_pos = m['spec_decode_num_accepted_tokens_per_pos']
    assert len(per_pos) == k and sum(per_pos) == m['spec_decode_num_accepted_tokens']
    assert per_pos[0] > 0 and all(a >= b for a, b in zip(per_pos, per_pos[1:]))
    # Fewer calls than tokens: accepted drafts gave several tokens per step.
    assert m['spec_decode_num_accepted_tokens'] > 0
    # Every page the answers filled is in the prefix cache (all their tokens were fetched;
    # the K/V of each sequence's last token is not written).
    for slot, (p, o) in enumerate(zip(prompts, plain)):
        assert eng.manager.committed_pages(eng._slot_seq[slot]) == (len(p) + len(o) - 1) // PAGE


def test_a_stop_id_inside_an_accepted_run(demo, prompts, plain):
    """A stop id the plain run emits mid-way ends the speculative run at the same token, with
    nothing after it (the drafts after it in the same step are dropped)."""
    stop = plain[0][len(plain[0]) // 2]
    cut = [o[:o.index(stop) + 1] if stop in o else o for o in plain]
    eng = engine(demo, 3)
    assert decode(eng, prompts, greedy(len(prompts), stop_ids=(stop,))) == cut


def test_a_small_pool_preempts_and_changes_no_output(demo, prompts, plain):
    """Other sequences hold all but 12 of the pool's pages (so the engine's programs are the
    other tests' ones): the four sequences need more, and are preempted in turn."""
    eng = engine(demo, 3)
    rng = np.random.default_rng(0)
    hogs = {f'hog {i}': n for i, n in enumerate((16, 16, 16, PAGES - 1 - 12 - 48))}
    for hog, n in hogs.items():  # uncommitted pages: never evictable
        eng.manager.begin(hog, rng.integers(0, 1000, n * PAGE).tolist())
    assert eng.manager.pool.num_free == 12
    settings = greedy(len(prompts))
    out = [[] for _ in prompts]
    for slot, p in enumerate(prompts):
        eng.insert(eng.prefill(p), slot, settings[slot])
    while any(len(o) < NEW for o in out):
        step = eng.generate()
        tokens, valid = np.asarray(step.tokens), np.asarray(step.valid)
        for slot in range(len(prompts)):
            out[slot] += tokens[slot][valid[slot]].tolist()
            if len(out[slot]) >= NEW:
                eng.free(slot)
    assert out == plain
    assert eng.manager.stats.preemptions > 0
    for hog in hogs:
        eng.manager.finish(hog)
    assert eng.manager.pool.num_free == eng.manager.pool.allocatable


def test_an_embedding_beside_speculating_streams_changes_neither(demo, prompts, plain):
    """Every slot decodes while an embedding call is computed in the mixed steps' extra row
    (the MTP layer runs over its positions too, in pages of its own): the streams' tokens are
    the plain ones, and the vectors those of the call computed alone."""
    inputs = [p * 3 for p in prompts[:2]]
    alone = engine(demo, 0).embed(inputs)
    eng = engine(demo, 1)
    settings = greedy(len(prompts))
    for slot, p in enumerate(prompts):
        eng.insert(eng.prefill(p), slot, settings[slot])
    out, results, key, done, computed = [[] for _ in prompts], [], None, False, None
    while not done or key is None:
        step = eng.generate()
        tokens, valid = np.asarray(step.tokens), np.asarray(step.valid)
        for slot in range(len(prompts)):
            out[slot] += tokens[slot][valid[slot]].tolist()
        if key is not None and computed is None and not eng.embedding_work:
            computed = min(len(o) for o in out)
        if key is None and all(f is None for f in eng._filling):  # every slot decodes
            key = eng.embed_begin(inputs)
        done = bool(np.asarray(step.done)[:len(prompts)].all())
        results += eng.embed_results()
    results += eng.embed_results(block=True)
    eng._fetch(keep=0)
    assert out == plain
    assert computed < NEW  # while the streams decode, not after
    assert [k for k, _ in results] == [key]
    np.testing.assert_allclose(results[0][1], alone, atol=1e-5)


def test_reserved_pages_follow_the_emitted_tokens(demo, prompts):
    """Each call may add k + 1 tokens per step; what a row really emitted tightens its bound
    when its tokens are fetched, so its pages stay within two calls of its length."""
    k = 3
    eng = engine(demo, k, max_seq_len=MAX_SEQ, num_pages=PAGES)
    eng.insert(eng.prefill(prompts[1]), 0, SlotSettings(max_new=90, temperature=0.0))
    n = 0
    for _ in range(12):
        step = eng.generate()
        n += int(np.asarray(step.valid)[0].sum())
    length = len(prompts[1]) + n - 1  # the last token's K/V is not written yet
    slack = 2 * eng.call_tokens  # the two calls whose tokens are not fetched yet
    held = len(eng.manager.page_table(eng._slot_seq[0]))
    assert length <= eng._bound[0] <= length + slack
    assert held <= pages_for(length + slack, PAGE)
    assert eng._bound[0] < len(prompts[1]) + 12 * eng.call_tokens  # what it would be untightened


def test_sampling_is_reproducible_from_its_seed(demo, prompts):
    def sampled(seed):
        settings = [SlotSettings(max_new=NEW, temperature=0.8, top_p=0.95, seed=seed + i,
                                 frequency_penalty=0.3, stop_ids=()) for i in range(2)]
        return decode(engine(demo, 3), prompts[:2], settings)
    a, b, c = sampled(1), sampled(1), sampled(2)
    assert a == b and a != c
    assert all(len(o) == NEW for o in a)


def test_a_checkpoint_without_mtp_is_refused(demo):
    cfg, params, _ = demo
    with pytest.raises(ValueError, match='MTP layer'):
        PagedEngine(cfg, {'model': params['model']}, 2, 64, speculative_tokens=1)
    with pytest.raises(ValueError, match='speculative_tokens'):
        PagedEngine(cfg, params, 2, 64, speculative_tokens=-1)


def test_on_a_mesh_greedy_equals_plain(demo, prompts, plain):
    """Experts over 4 devices, kv heads over 2: the MTP pages are laid out as the main ones."""
    cfg, params, tok = demo
    mesh = sharding.make_mesh({'expert': 4, 'tensor': 2})
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    eng = engine((cfg, sharded, tok), 3, mesh=mesh)
    assert decode(eng, prompts, greedy(len(prompts))) == plain
    k = eng.mtp_pages.k[0]
    assert k.sharding.is_equivalent_to(sharding.pages_shardings(cfg, mesh, k), k.ndim)


def test_through_the_server_text_and_stop_strings_are_the_plain_ones(demo, prompts, plain):
    """HTTP completions from a speculative server: the text equals the plain engine's, a
    stop string inside the output ends it where the plain text would end, streaming gives the
    same text, and /metrics counts the drafts. Warm-up compiles and leaves nothing."""
    cfg, params, tok = demo
    eng = engine(demo, 3)
    server = GlmServer(eng, tok, cfg, 'spec', 16).start()
    server.warmup()  # compiles every bucket, then starts the engine loop: nothing left behind
    assert eng.manager.pool.num_free == eng.manager.pool.allocatable
    assert eng.metrics()['spec_decode_num_drafts'] == 0
    front = start_http(server, None, '127.0.0.1', 0)
    url = f'http://127.0.0.1:{front.port}'
    try:
        full = tok.decode(plain[2])
        body = {'prompt': TEXTS[2], 'max_tokens': NEW, 'temperature': 0, 'ignore_eos': True}
        r = httpx.post(f'{url}/v1/completions', json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()['choices'][0]['text'] == full
        stop = full[len(full) // 2:len(full) // 2 + 3]
        r = httpx.post(f'{url}/v1/completions', json=body | {'stop': [stop]}, timeout=120)
        assert r.json()['choices'][0]['text'] == full[:full.index(stop)]
        with httpx.stream('POST', f'{url}/v1/completions', json=body | {'stream': True},
                          timeout=120) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith('data: ')]
        assert events[-1] == '[DONE]'
        assert ''.join(json.loads(e)['choices'][0]['text'] for e in events[:-1]) == full
        metrics = httpx.get(f'{url}/metrics', timeout=10).text
        accepted = re.search(r'^glmjax:spec_decode_num_accepted_tokens (\S+)$', metrics, re.M)
        assert float(accepted.group(1)) > 0
        assert 'glmjax:spec_decode_num_accepted_tokens_per_pos{position="2"}' in metrics
    finally:
        front.stop()
        server.shutdown(grace=5)


def run_logged(eng, prompts, news):
    """Greedy decoding of each prompt in its own slot, freed at its news[slot] tokens (the
    engine fetching two calls behind, as it does); returns the tokens per slot and, per
    decode call, (sequences running, whether it speculated)."""
    out = [[] for _ in prompts]
    for slot, p in enumerate(prompts):
        eng.insert(eng.prefill(p), slot, SlotSettings(max_new=news[slot], temperature=0.0,
                                                      stop_ids=()))
    calls = []
    while any(len(o) < n for o, n in zip(out, news)):
        running, before = sum(eng._in_use), dict(eng.spec_calls)
        step = eng.generate()
        tokens, valid = np.asarray(step.tokens), np.asarray(step.valid)
        for slot in range(len(prompts)):
            if len(out[slot]) < news[slot]:
                out[slot] += tokens[slot][valid[slot]].tolist()
                if len(out[slot]) >= news[slot]:
                    eng.free(slot)
        if eng.spec_calls != before:
            calls.append((running, eng.spec_calls['speculative'] > before['speculative']))
    return [o[:n] for o, n in zip(out, news)], calls


def test_above_its_batch_limit_the_engine_decodes_plainly_and_resumes(demo, prompts, plain):
    """speculative_max_batch=2: while three or four sequences decode, calls are plain (the
    MTP layer's K/V following); once two are freed, speculation resumes with drafts made
    from the last plain step's pair, which are accepted from its first step on. The tokens
    are the plain engine's throughout."""
    eng = engine(demo, 3, speculative_max_batch=2)
    news = [NEW, NEW, 8, 8]
    fetched, count = [], eng._count_accepted
    eng._count_accepted = lambda accepted: (fetched.append(accepted), count(accepted))
    out, calls = run_logged(eng, prompts, news)
    assert out == [p[:n] for p, n in zip(plain, news)]
    assert not any(spec for running, spec in calls if running > 2), calls
    two = [spec for running, spec in calls if running <= 2]
    assert two and all(two), calls
    eng._fetch(keep=0)
    m = eng.metrics()
    assert m['spec_decode_num_drafts'] > 0 and m['spec_decode_num_accepted_tokens'] > 0
    # The first speculative call's first step (stale drafts would accept nothing there).
    assert fetched[0][:2, 0].tolist() == [1, 1], fetched[0]


def test_warmup_measures_where_speculation_pays(demo, prompts, plain, monkeypatch):
    """speculative_max_batch None: warm-up times a speculative and a plain call of every row
    bucket (faked: of 2 rows speculation costs 100 plain calls, of 1 or 4 as much as one).
    The first calls speculate; once their acceptance is fetched, calls of two sequences are
    plain and calls of one speculate. The tokens are the plain engine's throughout."""
    timed = []

    def seconds(self, runs):
        for run in runs.values():
            jax.block_until_ready(run())
        timed.append(list(runs))
        return {name: 100.0 if name == 'speculative 2' else 1.0 for name in runs}

    monkeypatch.setattr(PagedEngine, '_seconds', seconds)
    eng = engine(demo, 1)  # the programs of the k = 1 test above
    assert eng.measures_speculation and eng.row_buckets == (1, 2, 4)
    eng.warmup()
    assert timed == [[f'speculative {rows}', f'plain {rows}'] for rows in (1, 2, 4)]  # in turn
    assert eng.spec_cost == {1: 1.0, 2: 100.0, 4: 1.0}
    assert eng.manager.pool.num_free == eng.manager.pool.allocatable
    news = [24, NEW]
    out, calls = run_logged(eng, prompts[:2], news)
    assert out == [p[:n] for p, n in zip(plain, news)]
    # The engine fetches two calls behind: the first three speculate before any acceptance
    # is known.
    two = [spec for running, spec in calls if running == 2]
    assert two[:3] == [True] * 3 and not any(two[3:]) and len(two) > 3, calls
    one = [spec for running, spec in calls if running == 1]
    assert one and all(one), calls
    m = eng.metrics()
    assert m['spec_decode_num_speculative_calls'] == sum(spec for _, spec in calls) > 0
    assert m['spec_decode_num_plain_calls'] == sum(not spec for _, spec in calls) > 0


def test_speculation_stops_while_it_emits_too_few_and_probes_again(demo, prompts, plain,
                                                                    monkeypatch):
    """A cost no k = 1 step reaches on average (1.99 tokens per verify step): once the
    estimate falls under it the calls are plain, except one in SPEC_PROBE_EVERY (3 here),
    which speculates to renew it. Greedy tokens unchanged."""
    import glmjax.serving.paged_engine as paged_engine
    monkeypatch.setattr(paged_engine, 'SPEC_PROBE_EVERY', 3)
    eng = engine(demo, 1)
    eng.spec_cost = {rows: 1.99 for rows in eng.row_buckets}  # as warm-up would set it
    out, calls = run_logged(eng, prompts[:1], [NEW])
    assert out == plain[:1]
    kinds = ''.join('s' if spec else 'p' for _, spec in calls)
    assert 'p' in kinds and 'pppp' not in kinds, kinds
    assert kinds.startswith('s')
    assert 1 < eng.spec_emitted < 1.99
