"""Host-side bookkeeping of the paged KV cache: which pages each sequence owns, and which full
pages are kept for reuse by later requests with the same prefix (prefix caching, as vLLM's
block pool does it). Pure Python and numpy; the device only ever sees the page tables and
write positions made here (layout in glmjax/paged_attention.py: L positions per page,
position p of a sequence at page `table[p // L]`, slot `p % L`).

Pages. Page 0 is the scratch page: never handed out, it fills unused page-table entries, so
a kernel that reads a whole block of pages past a row's length reads a real page. Every
other page is, at any time, exactly one of:
- free: unreferenced and holding nothing worth keeping;
- in use: referenced by one or more sequences (its refcount);
- evictable: unreferenced but cached (a full page whose tokens are known). It counts as free:
  `allocate` takes truly free pages first and then evicts cached ones, least recently used
  first, dropping their hash entries.

Prefix caching. A full page is keyed by a hash chain: hash(parent's key, its L token ids),
the first page's parent being a root key made from `extra_key` (anything else that changes
the KV: a LoRA, the model). A page's KV depends on every token before it, so equal keys mean
equal KV, whichever sequence computed it. A new sequence takes the longest run of cached full
pages that starts its prompt, by reference, and computes only the rest. At least one prompt
token is always left to compute, because the last one's logits give the first output token.
A page is registered (`commit`) only once it is full and its KV is written; if another
sequence registered the same key first, the later page stays private and is freed when
released. A finished sequence releases its pages tail first, so that the LRU order evicts the
end of a chain before its parents (evicting a parent would strand every descendant).

No copy-on-write. Only full, committed pages are ever shared, and a sequence writes only at
positions at or past what it has committed (`write_slots` checks it), which always lie in
pages it owns alone: a matched prefix ends at a page boundary and the rest of the prompt
goes into new pages. So no write ever targets a page with refcount > 1 and there is nothing
to copy. Sharing a partial last page would save at most L - 1 tokens of prefill per request
and cost a device copy on the sharer's first write; not worth it.

Determinism. Free pages are handed out in a fixed order and keys are blake2b over
little-endian int32 bytes (not Python's per-process salted `hash`), so the same calls give
the same page ids in every process: tests and lockstep replay can rely on it.
"""

import dataclasses
import hashlib
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Iterator, Sequence

import numpy as np

SCRATCH_PAGE = 0


class OutOfPages(Exception):
    """Fewer free (or evictable) pages than asked for; nothing was allocated."""


def root_key(extra_key: str | bytes | None = None) -> bytes:
    """The parent key of a sequence's first page."""
    extra = extra_key.encode() if isinstance(extra_key, str) else (extra_key or b'')
    return hashlib.blake2b(b'glmjax-kv-pages\0' + extra, digest_size=16).digest()


def page_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full page: its parent's key chained with its token ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype='<i4').tobytes())
    return h.digest()


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PagePool:
    """Reference counts, the free list and the prefix cache's key -> page map."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2 or page_size < 1:
            raise ValueError(f'need num_pages >= 2 (page 0 is scratch) and page_size >= 1, '
                             f'got {num_pages} and {page_size}')
        self.num_pages = num_pages
        self.page_size = page_size
        self.evictions = 0
        self._refs = [0] * num_pages
        self._free = deque(range(1, num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}

    @property
    def allocatable(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: truly free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.allocatable - self.num_free

    @property
    def usage(self) -> float:
        """Pages in use / allocatable pages (vLLM's kv_cache_usage_perc), 0 to 1."""
        return self.num_used / self.allocatable

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    def allocate(self, n: int) -> list[int]:
        """n pages at refcount 1, all or none (OutOfPages)."""
        if n > self.num_free:
            raise OutOfPages(f'asked for {n} pages, {self.num_free} free')
        pages = [self._free.popleft() for _ in range(min(n, len(self._free)))]
        while len(pages) < n:
            page, _ = self._evictable.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            self.evictions += 1
            pages.append(page)
        for p in pages:
            self._refs[p] = 1
        return pages

    def take(self, pages: Sequence[int]) -> None:
        """One more reference to each of these cached or in-use pages (a prefix-cache hit)."""
        for p in pages:
            if self._refs[p] == 0:
                if p not in self._evictable:
                    raise ValueError(f'page {p} is free; only cached pages can be taken')
                del self._evictable[p]
            self._refs[p] += 1

    def release(self, pages: Sequence[int]) -> None:
        """One reference fewer to each page, in order: the first to reach 0 is evicted first."""
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f'page {p} released more often than referenced')
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._key_of:
                    self._evictable[p] = None
                else:
                    self._free.append(p)

    def lookup(self, key: bytes) -> int | None:
        return self._page_of.get(key)

    def register(self, page: int, key: bytes) -> bool:
        """Caches a full, written, referenced page under key. False (and nothing changes)
        when another page already holds that key: this one stays private."""
        if self._refs[page] < 1 or page in self._key_of:
            raise ValueError(f'page {page} must be referenced and not yet cached')
        if key in self._page_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True


@dataclasses.dataclass
class PageStats:
    """Counters named as vLLM's: prefix-cache queries and hits are in tokens."""
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0


@dataclasses.dataclass
class _Seq:
    root: bytes
    pages: list[int]
    keys: list[bytes]  # keys of the committed full pages, pages[:len(keys)]
    # Keys of the prompt's full pages that leave a token to compute: what it may take
    # from the cache, now (begin) or once another sequence has computed them (extend).
    shareable: list[bytes]
    written: int  # tokens whose K/V is written, from position 0 (taken ones included)


class PageManager:
    """Pages per sequence, for a scheduler: `begin` a sequence (prefix match and the pages for
    its first chunk), `reserve` pages before each step that grows it, `commit` what the step
    wrote, and `finish` or `preempt` it. Sequence ids are any hashable."""

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int | None = None,
                 prefix_caching: bool = True):
        self.pool = PagePool(num_pages, page_size)
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq or self.pool.allocatable
        self.prefix_caching = prefix_caching
        self.stats = PageStats()
        self._seqs: dict[Hashable, _Seq] = {}

    @property
    def max_tokens(self) -> int:
        """The longest sequence that could ever fit, alone in the pool."""
        return min(self.max_pages_per_seq, self.pool.allocatable) * self.page_size

    def can_ever_fit(self, num_tokens: int) -> bool:
        """False: a request of this many tokens (prompt + max new) must be refused, not queued."""
        return num_tokens <= self.max_tokens

    def cached_prefix(self, tokens: Sequence[int], extra_key: str | bytes | None = None) -> int:
        """Tokens of this prompt that `begin` would take from the cache now; changes nothing."""
        return len(self._match(self._keys(tokens, root_key(extra_key)))[0]) * self.page_size

    def begin(self, seq_id: Hashable, prompt: Sequence[int], *,
              extra_key: str | bytes | None = None, budget: int | None = None) -> int | None:
        """Starts a sequence: takes its cached prefix by reference and allocates pages up to
        min(len(prompt), cached + budget) tokens (budget: tokens to compute in its first
        step; None: the whole prompt). Returns the cached token count, or None when the pages
        are not there, in which case nothing changed (the request waits)."""
        if seq_id in self._seqs:
            raise ValueError(f'sequence {seq_id!r} already begun')
        if len(prompt) == 0 or (budget is not None and budget < 1):
            raise ValueError('need a non-empty prompt and a budget of at least one token')
        root = root_key(extra_key)
        shareable = list(self._keys(prompt, root))
        matched, keys = self._match(shareable)
        cached = len(matched) * self.page_size
        end = len(prompt) if budget is None else min(len(prompt), cached + budget)
        self._check_length(end)
        need = pages_for(end, self.page_size) - len(matched)
        # Matched pages that sit evictable stop counting as free once taken.
        if need > self.pool.num_free - sum(self.pool.refcount(p) == 0 for p in matched):
            return None
        self.pool.take(matched)
        pages = matched + self.pool.allocate(need)
        self._seqs[seq_id] = _Seq(root, pages, keys, shareable, cached)
        if self.prefix_caching:
            self.stats.prefix_cache_queries += len(prompt)
            self.stats.prefix_cache_hits += cached
        return cached

    def extend(self, seq_id: Hashable) -> int:
        """Takes the cached pages that continue the sequence's prompt past what it has
        written, by reference, in place of its own unwritten ones: pages another sequence
        committed since this one began. Only while what it wrote ends at a page boundary (a
        page it wrote part of stays its own). Returns the tokens taken (0: none)."""
        seq, L = self._seqs[seq_id], self.page_size
        n = len(seq.keys)
        if seq.written != n * L:
            return 0
        matched, keys = self._match(seq.shareable[n:])
        if not matched:
            return 0
        self.pool.take(matched)
        own = seq.pages[n:n + len(matched)]
        seq.pages[n:n + len(own)] = matched
        self.pool.release(own[::-1])
        seq.keys += keys
        seq.written = len(seq.keys) * L
        self.stats.prefix_cache_hits += len(matched) * L
        return len(matched) * L

    def waits_on(self, seq_id: Hashable, other_id: Hashable) -> bool:
        """Whether the sequence's next page to compute is one the other sequence has yet to
        write: the same key (so the same tokens before it) at the same place in both
        prompts. Waiting for the other and then taking the page (`extend`) computes it
        once instead of twice."""
        seq, other, L = self._seqs[seq_id], self._seqs[other_id], self.page_size
        n = len(seq.keys)
        return (self.prefix_caching and seq.written == n * L and n < len(seq.shareable)
                and n < len(other.shareable)
                and other.shareable[n] == seq.shareable[n] and other.written < (n + 1) * L)

    def reserve(self, seq_id: Hashable, new_len: int) -> bool:
        """Makes sure the sequence has pages for new_len tokens. False when the pool is short
        (nothing changed: preempt someone or wait)."""
        seq = self._seqs[seq_id]
        self._check_length(new_len)
        need = pages_for(new_len, self.page_size) - len(seq.pages)
        if need > self.pool.num_free:
            return False
        if need > 0:
            seq.pages += self.pool.allocate(need)
        return True

    def commit(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
        """Registers the sequence's newly full pages in the prefix cache. tokens: the
        sequence's tokens whose KV has been written, from position 0 (not a just-sampled token
        whose KV the next step writes)."""
        seq = self._seqs[seq_id]
        L = self.page_size
        if len(tokens) > len(seq.pages) * L:
            raise ValueError(f'{len(tokens)} tokens written but only {len(seq.pages)} pages')
        if len(tokens) < seq.written:
            raise ValueError(f'{len(tokens)} tokens written, but {seq.written} already were')
        seq.written = len(tokens)
        for i in range(len(seq.keys), len(tokens) // L):
            key = seq.shareable[i] if i < len(seq.shareable) else \
                page_key(seq.keys[-1] if seq.keys else seq.root, tokens[i * L:(i + 1) * L])
            seq.keys.append(key)
            if self.prefix_caching:
                self.pool.register(seq.pages[i], key)

    def committed_pages(self, seq_id: Hashable) -> int:
        """The sequence's full pages registered by `commit` (or taken from the cache)."""
        return len(self._seqs[seq_id].keys)

    def page_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seqs[seq_id].pages)

    def finish(self, seq_id: Hashable) -> None:
        """Drops the sequence's references (finished or cancelled); its cached pages stay."""
        seq = self._seqs.pop(seq_id)
        self.pool.release(seq.pages[::-1])

    def preempt(self, seq_id: Hashable) -> None:
        """As finish, counted: the scheduler begins it again later with all its tokens as the
        prompt, and its committed pages, unless evicted meanwhile, come back as a cache hit."""
        self.finish(seq_id)
        self.stats.preemptions += 1

    def page_table_array(self, seq_ids: Sequence[Hashable], max_seqs: int) -> np.ndarray:
        """The device step's page table: [max_seqs, max_pages_per_seq] int32, row r for
        seq_ids[r], every unused entry the scratch page 0."""
        if len(seq_ids) > max_seqs:
            raise ValueError(f'{len(seq_ids)} sequences for {max_seqs} rows')
        table = np.full((max_seqs, self.max_pages_per_seq), SCRATCH_PAGE, np.int32)
        for r, seq_id in enumerate(seq_ids):
            pages = self._seqs[seq_id].pages
            table[r, :len(pages)] = pages
        return table

    def write_slots(self, seq_id: Hashable, start: int, stop: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(page, offset) of positions start..stop-1 of a sequence, [stop - start] int32
        each, for the writes of a step. Refuses positions in committed pages, which may be
        shared: their KV must never change."""
        seq = self._seqs[seq_id]
        L = self.page_size
        if start < len(seq.keys) * L or stop > len(seq.pages) * L:
            raise ValueError(f'cannot write positions {start}..{stop}: committed up to '
                             f'{len(seq.keys) * L}, pages up to {len(seq.pages) * L}')
        positions = np.arange(start, stop)
        pages = np.asarray(seq.pages, np.int32)[positions // L]
        return pages, (positions % L).astype(np.int32)

    def metrics(self) -> dict[str, float]:
        """Counters and gauges for the metrics endpoint (`kv_cache_usage` is the key
        serving/metrics.py exports as kv_cache_usage_perc; the rest are named as vLLM's)."""
        return {'kv_cache_usage': self.pool.usage, 'num_free_pages': self.pool.num_free,
                'num_cached_pages': self.pool.num_cached, 'evictions': self.pool.evictions,
                **dataclasses.asdict(self.stats)}

    def _keys(self, tokens: Sequence[int], root: bytes) -> Iterator[bytes]:
        """The keys of the full pages of tokens that leave at least one token to compute (the
        last one's logits give the next token), lazily."""
        key, L = root, self.page_size
        for i in range((len(tokens) - 1) // L):
            key = page_key(key, tokens[i * L:(i + 1) * L])
            yield key

    def _match(self, keys: Iterable[bytes]) -> tuple[list[int], list[bytes]]:
        """The cached pages (and their keys) of the longest run of keys that are cached."""
        if not self.prefix_caching:
            return [], []
        pages, matched = [], []
        for key in keys:
            page = self.pool.lookup(key)
            if page is None:
                break
            pages.append(page)
            matched.append(key)
        return pages, matched

    def _check_length(self, num_tokens: int) -> None:
        # A caller bug (the 400 check comes first), not memory pressure: fail loudly.
        if not self.can_ever_fit(num_tokens):
            raise ValueError(f'{num_tokens} tokens can never fit: at most {self.max_tokens} '
                             f'({self.max_pages_per_seq} pages per sequence, '
                             f'{self.pool.allocatable} in the pool, {self.page_size} per page)')
