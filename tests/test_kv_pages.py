"""Host-side page bookkeeping: reference counts, prefix matching by full pages, LRU eviction,
all-or-nothing allocation, the scratch page, determinism, and a random scheduler run whose
pages all come back. A fake device keeps, per (page, offset), the token prefix whose KV would
be there, so every test that reads pages can tell a wrongly shared page from a right one."""

import copy
import random

import numpy as np
import pytest

from glmjax.serving.kv_pages import (
    SCRATCH_PAGE,
    OutOfPages,
    PageManager,
    PagePool,
    page_key,
    root_key,
)

L = 4  # page size in every test


def toks(start, n):
    return list(range(start, start + n))


def run(m, seq_id, prompt, **kw):
    """Begins a sequence and commits its whole prompt, as if one prefill step wrote it."""
    cached = m.begin(seq_id, prompt, **kw)
    assert cached is not None
    m.commit(seq_id, prompt)
    return cached


def snapshot(m):
    pool = m.pool
    return ([pool.refcount(p) for p in range(pool.num_pages)],
            [pool.is_cached(p) for p in range(pool.num_pages)],
            pool.num_free, pool.evictions, {s: m.page_table(s) for s in m._seqs},
            copy.copy(m.stats))


def test_two_sequences_share_prefix_pages_by_reference():
    m = PageManager(num_pages=16, page_size=L)
    a = toks(100, 10)
    assert run(m, 'a', a) == 0
    b = a[:8] + toks(500, 3)
    assert m.begin('b', b) == 8
    ta, tb = m.page_table('a'), m.page_table('b')
    assert tb[:2] == ta[:2] and tb[2] not in ta
    assert [m.pool.refcount(p) for p in ta] == [2, 2, 1]
    assert m.pool.num_used == 4
    m.finish('a')
    assert [m.pool.refcount(p) for p in tb] == [1, 1, 1]
    m.finish('b')
    assert all(m.pool.refcount(p) == 0 for p in range(16))
    assert m.pool.is_cached(ta[0]) and m.pool.is_cached(ta[1]) and not m.pool.is_cached(ta[2])
    assert m.pool.num_free == m.pool.allocatable and m.pool.usage == 0
    assert m.stats.prefix_cache_queries == 21 and m.stats.prefix_cache_hits == 8


def test_match_takes_full_pages_only_and_never_the_whole_prompt():
    m = PageManager(num_pages=32, page_size=L)
    a = toks(0, 10)  # pages [0:4] [4:8] full, [8:10] partial
    run(m, 'a', a)
    assert not m.pool.is_cached(m.page_table('a')[2])  # a partial page is never cached
    assert m.cached_prefix(a + [99]) == 8  # not 10: the partial page is not shared
    assert m.cached_prefix(a[:8]) == 4  # the whole prompt is cached, one page is recomputed
    assert m.cached_prefix(a[:9]) == 8
    assert m.cached_prefix(a[:5]) == 4 and m.cached_prefix(a[:4]) == 0
    assert m.cached_prefix([1] + a[1:]) == 0  # a different first token breaks the chain
    assert m.begin('b', a[:8]) == 4
    assert m.page_table('b')[0] == m.page_table('a')[0]
    assert m.page_table('b')[1] != m.page_table('a')[1]


def test_eviction_takes_free_pages_then_lru_cached_tail_first():
    m = PageManager(num_pages=7, page_size=L)  # pages 1..6
    x, y = toks(0, 9), toks(50, 9)
    run(m, 'x', x)  # pages 1, 2 cached, 3 partial
    m.finish('x')
    run(m, 'y', y)  # pages 4, 5 cached, 6 partial
    m.finish('y')
    assert m.pool.num_free == 6 and m.pool.num_cached == 4
    # Free pages (3, 6) first, then x's, the least recently used, its tail (2) before its head.
    assert m.begin('z', toks(200, 12)) == 0
    assert m.page_table('z') == [3, 6, 2]
    assert m.pool.evictions == 1
    assert m.cached_prefix(x + [0]) == 4 and m.cached_prefix(y + [0]) == 8
    assert m.reserve('z', 16)
    assert m.page_table('z') == [3, 6, 2, 1] and m.pool.evictions == 2
    assert m.cached_prefix(x + [0]) == 0 and m.cached_prefix(y + [0]) == 8
    m.finish('z')
    assert m.begin('x2', x) == 0  # the identical prefix now misses


def test_a_hit_refreshes_lru_order():
    m = PageManager(num_pages=5, page_size=L)  # pages 1..4
    x, y = toks(0, 5), toks(50, 5)
    run(m, 'x', x)
    m.finish('x')
    run(m, 'y', y)
    m.finish('y')
    assert m.begin('x2', x) == 4  # x's page is used again: y's is now the oldest
    m.finish('x2')
    m.begin('z', toks(200, 12))  # two free pages, then one eviction
    assert m.cached_prefix(y) == 0 and m.cached_prefix(x) == 4


def test_failed_reserve_and_begin_change_nothing():
    m = PageManager(num_pages=11, page_size=L)  # pages 1..10
    x = toks(0, 9)
    run(m, 'x', x)
    m.finish('x')  # 2 cached evictable pages
    assert m.begin('a', toks(100, 6)) == 0 and m.begin('c', toks(200, 8)) == 0
    assert m.pool.num_free == 6  # 4 truly free, 2 evictable
    before = snapshot(m)
    twin = copy.deepcopy(m)
    assert not m.reserve('a', 33)  # 9 pages: 7 more
    # x's 2 pages count in num_free, but taking them uses them up: 2 matched + 5 new pages
    # needs 7 of the 6 free.
    assert m.begin('b', x[:8] + toks(300, 17)) is None
    assert snapshot(m) == before
    # The free list and LRU order are untouched too: the same next calls give the same pages.
    for mm in (m, twin):
        assert mm.begin('b', x[:8] + toks(300, 12)) == 8
        assert mm.reserve('a', 12)
    assert snapshot(m) == snapshot(twin) and m.pool.num_free == 0


def test_allocation_is_all_or_nothing_and_never_hands_out_page_zero():
    pool = PagePool(num_pages=8, page_size=L)
    pages = pool.allocate(7)
    assert sorted(pages) == list(range(1, 8)) and SCRATCH_PAGE not in pages
    with pytest.raises(OutOfPages):
        pool.allocate(1)
    pool.release(pages[:2])
    with pytest.raises(OutOfPages):
        pool.allocate(3)
    assert pool.num_free == 2 and pool.num_used == 5 and pool.usage == 5 / 7
    assert sorted(pool.allocate(2)) == sorted(pages[:2])
    with pytest.raises(ValueError):
        pool.release([SCRATCH_PAGE])


def test_preempted_sequence_resumes_from_its_committed_pages():
    m = PageManager(num_pages=16, page_size=L)
    prompt = toks(0, 6)
    run(m, 'a', prompt)
    tokens = prompt + [7, 8, 9]  # generated; the KV of 9 is not written yet
    assert m.reserve('a', 8)
    m.commit('a', tokens[:8])
    m.preempt('a')
    assert m.stats.preemptions == 1 and m.pool.num_free == 15
    assert m.begin('a', tokens) == 8


def test_same_prompt_computed_twice_caches_one_copy():
    m = PageManager(num_pages=16, page_size=L)
    p = toks(0, 9)
    assert m.begin('a', p) == 0 and m.begin('b', p) == 0  # neither committed yet
    m.commit('a', p)
    m.commit('b', p)
    ta, tb = m.page_table('a'), m.page_table('b')
    m.finish('a')
    m.finish('b')
    assert m.pool.num_cached == 2 and all(m.pool.is_cached(q) for q in ta[:2])
    assert not any(m.pool.is_cached(q) for q in tb)
    assert m.pool.num_free == 15


def test_a_prompt_waits_for_the_pages_an_older_one_computes_and_takes_them():
    """b begins while a computes the same 12-token prefix: b waits on a's next page until a
    writes it, then takes it by reference in place of its own unwritten page, page by page
    as a goes; past the shared pages, or once b has written part of a page, it goes alone."""
    m = PageManager(num_pages=32, page_size=L)
    shared = toks(100, 12)
    a, b = shared + toks(0, 5), shared + toks(50, 2)
    assert m.begin('a', a, budget=6) == 0 and m.begin('b', b, budget=1) == 0
    assert m.waits_on('b', 'a') and m.extend('b') == 0
    m.commit('a', a[:6])  # page 0 written
    own = m.page_table('b')[0]
    assert m.extend('b') == 4
    assert m.page_table('b') == m.page_table('a')[:1] and m.pool.refcount(own) == 0
    assert m.waits_on('b', 'a')  # page 1: a has written 2 of its 4 tokens
    assert m.reserve('a', 14)
    m.commit('a', a[:14])
    assert m.extend('b') == 8 and m.page_table('b') == m.page_table('a')[:3]
    assert [m.pool.refcount(q) for q in m.page_table('a')] == [2, 2, 2, 1]
    assert not m.waits_on('b', 'a')  # b's last full page is left for it to compute
    assert m.stats.prefix_cache_hits == 12
    assert m.reserve('b', 14)
    m.commit('b', b)
    assert m.extend('b') == 0
    # Diverging at page 1: c waits on page 0 only; once c wrote part of a page, never.
    c = shared[:4] + toks(200, 9)
    assert m.begin('c', c, budget=1) == 4 and not m.waits_on('c', 'a')
    d = toks(300, 9)
    e = d[:2] + toks(400, 7)
    assert m.begin('d', d, budget=1) == 0 and m.begin('e', e, budget=2) == 0
    m.commit('e', e[:2])
    assert not m.waits_on('d', 'e') and not m.waits_on('e', 'd') and m.extend('e') == 0
    for seq in 'abcde':
        m.finish(seq)
    assert m.pool.num_free == m.pool.allocatable
    off = PageManager(num_pages=16, page_size=L, prefix_caching=False)
    assert off.begin('a', a, budget=6) == 0 and off.begin('b', b, budget=1) == 0
    off.commit('a', a[:6])
    assert not off.waits_on('b', 'a') and off.extend('b') == 0


def test_extra_key_separates_caches_and_disabled_caching_shares_nothing():
    m = PageManager(num_pages=16, page_size=L)
    p = toks(0, 9)
    run(m, 'a', p, extra_key='lora-1')
    assert m.cached_prefix(p) == 0 and m.cached_prefix(p, extra_key='lora-2') == 0
    assert m.cached_prefix(p, extra_key='lora-1') == 8
    off = PageManager(num_pages=16, page_size=L, prefix_caching=False)
    run(off, 'a', p)
    assert off.begin('b', p) == 0 and off.pool.num_cached == 0
    assert off.stats.prefix_cache_queries == 0


def test_budget_reserve_and_length_limits():
    m = PageManager(num_pages=9, page_size=L, max_pages_per_seq=4)
    assert m.max_tokens == 16 and m.can_ever_fit(16) and not m.can_ever_fit(17)
    assert PageManager(num_pages=9, page_size=L).max_tokens == 32
    assert m.begin('a', toks(0, 14), budget=5) == 0
    assert len(m.page_table('a')) == 2  # 5 tokens of the first chunk
    assert m.reserve('a', 14) and len(m.page_table('a')) == 4
    assert m.reserve('a', 3) and len(m.page_table('a')) == 4  # never shrinks
    with pytest.raises(ValueError):
        m.reserve('a', 17)
    with pytest.raises(ValueError):
        m.begin('b', toks(0, 17))


def test_write_slots_map_positions_and_refuse_committed_pages():
    m = PageManager(num_pages=16, page_size=L)
    p = toks(0, 10)
    assert m.begin('a', p) == 0
    table = m.page_table('a')
    pages, offsets = m.write_slots('a', 2, 10)
    assert pages.dtype == np.int32 and offsets.dtype == np.int32
    assert pages.tolist() == [table[q // L] for q in range(2, 10)]
    assert offsets.tolist() == [2, 3, 0, 1, 2, 3, 0, 1]
    m.commit('a', p)
    with pytest.raises(ValueError):
        m.write_slots('a', 7, 10)  # position 7 is in a committed (shareable) page
    with pytest.raises(ValueError):
        m.write_slots('a', 8, 13)  # past the reserved pages
    assert m.write_slots('a', 8, 12)[0].tolist() == [table[2]] * 4
    assert m.begin('b', p[:8] + [1, 2]) == 8
    with pytest.raises(ValueError):
        m.write_slots('b', 4, 9)  # a shared page


def test_page_table_array_shape_and_padding():
    m = PageManager(num_pages=32, page_size=L, max_pages_per_seq=6)
    m.begin('a', toks(0, 9))
    m.begin('b', toks(100, 2))
    table = m.page_table_array(['b', 'a'], max_seqs=4)
    assert table.shape == (4, 6) and table.dtype == np.int32
    assert table[0].tolist() == m.page_table('b') + [SCRATCH_PAGE] * 5
    assert table[1].tolist() == m.page_table('a') + [SCRATCH_PAGE] * 3
    assert not table[2:].any()
    with pytest.raises(ValueError):
        m.page_table_array(['a', 'b'], max_seqs=1)


def test_keys_are_stable_across_processes():
    # Literals: Python's salted hash() would differ from run to run.
    assert page_key(root_key(), [1, 2, 3, 4]).hex() == '1dd9412d3b2ede639bffa685384a075e'
    assert root_key('lora-a').hex() == 'd176a739e24f941767c39691f65a5e7b'
    assert page_key(root_key(), np.array([1, 2, 3, 4])) == page_key(root_key(), [1, 2, 3, 4])


def simulate(seed, num_requests=500):
    """A scheduler over a small pool: arrivals with shared prefixes, chunked prefill, decode,
    preemption when pages run short, cancellations. Checks every written page reads back the
    sequence's own tokens. Returns the manager, a log of every page table handed out, and
    how often a prompt took pages computed since it began and waited for them."""
    rng = random.Random(seed)
    m = PageManager(num_pages=25, page_size=L, max_pages_per_seq=12)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(4)]
    kv = {}  # (page, offset) -> the tokens up to that position: what its KV depends on
    waiting, running, log = [], {}, []
    counts = {'taken': 0, 'waited': 0}
    arrived = finished = 0
    while finished < num_requests:
        if arrived < num_requests and rng.random() < 0.6:
            prompt = rng.choice(prefixes)[:rng.randrange(1, 30)]
            prompt = prompt + [rng.randrange(50) for _ in range(rng.randrange(0, 8))]
            target = min(len(prompt) + rng.randrange(1, 12), m.max_tokens)
            waiting.append((arrived, prompt, target))
            arrived += 1
        while waiting:  # admit while pages last, so that running sequences run short
            seq_id, tokens, target = waiting[0]
            cached = m.begin(seq_id, tokens, budget=rng.randrange(1, 17))
            if cached is None:
                break
            waiting.pop(0)
            running[seq_id] = [tokens, cached, target, len(tokens)]
            check_reads(m, kv, seq_id, tokens, cached)
        for seq_id in list(running):
            if seq_id not in running:
                continue  # preempted by an earlier row of this step
            if rng.random() < 0.03:
                m.finish(seq_id)  # cancelled
                del running[seq_id]
                finished += 1
                continue
            finished += step(m, rng, kv, running, waiting, seq_id, counts)
            if seq_id in running:
                log.append((seq_id, m.page_table(seq_id)))
        check_invariants(m, running)
    return m, log, counts


def step(m, rng, kv, running, waiting, seq_id, counts):
    """One engine step of a sequence: write a chunk (prefill) or one token (decode). A
    prompt first takes the pages older prompts computed meanwhile, and waits while one of
    them has its next page to compute."""
    tokens, written, target, prompt_len = running[seq_id]
    if written < prompt_len:
        taken = m.extend(seq_id)
        counts['taken'] += taken > 0
        written += taken
        check_reads(m, kv, seq_id, tokens, written)
        running[seq_id][1] = written
        older = list(running)[:list(running).index(seq_id)]
        if any(m.waits_on(seq_id, o) for o in older if running[o][1] < running[o][3]):
            counts['waited'] += 1
            return 0
    new_len = min(len(tokens), written + rng.randrange(1, 9))
    while not m.reserve(seq_id, new_len):
        victim = next(s for s in reversed(running) if s != seq_id)  # the newest other
        m.preempt(victim)
        waiting.insert(0, (victim, *running.pop(victim)[::2]))
    pages, offsets = m.write_slots(seq_id, written, new_len)
    for pos, page, off in zip(range(written, new_len), pages, offsets):
        kv[page, off] = tuple(tokens[:pos + 1])
    m.commit(seq_id, tokens[:new_len])
    running[seq_id][1] = new_len
    if new_len < len(tokens):
        return 0
    if len(tokens) == target:
        m.finish(seq_id)
        del running[seq_id]
        return 1
    tokens.append(rng.randrange(50))  # sampled; its KV is written by the next step
    return 0


def check_reads(m, kv, seq_id, tokens, upto):
    table = m.page_table(seq_id)
    for pos in range(upto):
        assert kv[table[pos // L], pos % L] == tuple(tokens[:pos + 1])


def check_invariants(m, running):
    pool = m.pool
    refs = [0] * pool.num_pages
    for seq_id in running:
        table = m.page_table(seq_id)
        assert SCRATCH_PAGE not in table and len(set(table)) == len(table)
        for p in table:
            refs[p] += 1
    assert refs == [pool.refcount(p) for p in range(pool.num_pages)]
    assert all(pool.is_cached(p) for p in range(pool.num_pages) if refs[p] > 1)
    assert pool.num_used == sum(r > 0 for r in refs)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_requests_return_every_page(seed):
    m, _, counts = simulate(seed)
    pool = m.pool
    assert m.stats.prefix_cache_hits > 0 and m.stats.preemptions > 0 and pool.evictions > 0
    assert counts['taken'] > 0 and counts['waited'] > 0
    assert pool.num_free == pool.allocatable and pool.num_used == 0
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))
    assert pool.num_cached > 0
    pages = pool.allocate(pool.allocatable)  # cached pages are reclaimable
    assert sorted(pages) == list(range(1, pool.num_pages)) and pool.num_cached == 0


def test_same_calls_give_same_pages():
    m1, log1, _ = simulate(7, num_requests=100)
    m2, log2, _ = simulate(7, num_requests=100)
    assert log1 == log2 and m1.metrics() == m2.metrics()
    assert log1 != simulate(8, num_requests=100)[1]
