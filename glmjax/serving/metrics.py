"""Prometheus metrics of the HTTP front, named like vLLM's with a `glmjax:` prefix."""

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], dict[str, float]]):
        self.stats = stats
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram('glmjax:time_to_first_token_seconds', 'Time to first token',
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram('glmjax:time_per_output_token_seconds',
                              'Time per output token after the first', buckets=_LATENCY,
                              registry=r)
        self.e2e = Histogram('glmjax:e2e_request_latency_seconds', 'End-to-end latency',
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram('glmjax:request_queue_time_seconds', 'Time waiting for a slot',
                               buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter('glmjax:prompt_tokens', 'Prompt tokens processed',
                                     registry=r)
        self.generation_tokens = Counter('glmjax:generation_tokens', 'Tokens generated',
                                         registry=r)
        self.running = Gauge('glmjax:num_requests_running', 'Requests in decode slots',
                             registry=r)
        self.waiting = Gauge('glmjax:num_requests_waiting', 'Requests queued', registry=r)
        self.kv_usage = Gauge('glmjax:kv_cache_usage_perc', 'KV-cache use, 0 to 1',
                              registry=r)
        # Totals since start, from the engine.
        self.engine_totals = {
            key: Gauge(f'glmjax:{key}', what, registry=r) for key, what in (
                ('prefix_cache_queries', 'Prompt tokens looked up in the prefix cache'),
                ('prefix_cache_hits', 'Prompt tokens found in the prefix cache'),
                ('num_preemptions', 'Sequences preempted for lack of KV pages'),
                ('spec_decode_num_drafts', 'Speculative steps of a sequence (one draft run)'),
                ('spec_decode_num_draft_tokens', 'Draft tokens proposed'),
                ('spec_decode_num_accepted_tokens', 'Draft tokens accepted'),
                ('spec_decode_num_speculative_calls', 'Decode calls that speculated'),
                ('spec_decode_num_plain_calls', 'Decode calls of a speculating engine that '
                 'did not (the measured rule or --speculative_max_batch)'))}
        self.accepted_per_pos = Gauge('glmjax:spec_decode_num_accepted_tokens_per_pos',
                                      'Draft tokens accepted at each draft position',
                                      ['position'], registry=r)

    def render(self) -> bytes:
        s = self.stats()
        self.running.set(s.get('running', 0))
        self.waiting.set(s.get('waiting', 0))
        self.kv_usage.set(s.get('kv_cache_usage', 0))
        for key, gauge in self.engine_totals.items():
            gauge.set(s.get(key, s.get(key.removeprefix('num_'), 0)))
        for position, n in enumerate(s.get('spec_decode_num_accepted_tokens_per_pos', ())):
            self.accepted_per_pos.labels(position=str(position)).set(n)
        return generate_latest(self.registry)

    async def track(self, events: AsyncIterator, n_prompt: int) -> AsyncIterator:
        """Passes events through, timing them."""
        start = time.perf_counter()
        first, n = None, 0
        self.prompt_tokens.inc(n_prompt)
        try:
            async for e in events:
                if e.queue_time is not None:
                    self.queue.observe(e.queue_time)
                if e.token_ids and first is None:
                    first = time.perf_counter()
                    self.ttft.observe(first - start)
                n += len(e.token_ids)
                self.generation_tokens.inc(len(e.token_ids))
                yield e
        finally:  # a client that left: the engine request is cancelled
            if hasattr(events, 'aclose'):
                await events.aclose()
        end = time.perf_counter()
        self.e2e.observe(end - start)
        if first is not None and n > 1:
            self.tpot.observe((end - first) / (n - 1))
