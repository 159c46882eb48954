"""The engine behind the HTTP API: the same orchestrator (slots, queue, threads) that serves
gRPC, seen as the async `Backend` that glmjax/serving/openai_api.py talks to."""

import asyncio

import numpy as np

from glmjax.config import GlmConfig
from glmjax.serving.chat import ChatTemplate
from glmjax.serving.contract import GenRequest, Limits, matcher, slot_settings
from glmjax.serving.openai_api import ApiError, GenEvent, TokenLogprob
from glmjax.serving.orchestrator import Chunk, Draining, Orchestrator, QueueFull, Request
from glmjax.serving.tokenizer import Tokenizer

RETRY_AFTER_S = 1  # what 429 and 503 tell clients to wait


class EngineBackend:
    def __init__(self, orchestrator: Orchestrator, tokenizer: Tokenizer, cfg: GlmConfig,
                 model_name: str, max_seq_len: int, chat_template: ChatTemplate,
                 ready=lambda: True, draining=lambda: False,
                 served_names: tuple[str, ...] = ()):
        self.orchestrator, self.tokenizer, self.cfg = orchestrator, tokenizer, cfg
        self.model_name, self.max_context, self.chat_template = (
            model_name, max_seq_len, chat_template)
        self.served_names = tuple(dict.fromkeys((model_name,) + tuple(served_names)))
        self.vocab_size = cfg.vocab_size
        self.eos_ids = tuple(cfg.eos_token_ids)
        self.ready, self.draining = ready, draining
        self.moderation = None  # safety_model's classifier; None: the default file

    @property
    def limits(self) -> Limits:
        return Limits(self.vocab_size, self.max_context, self.eos_ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def generate_all(self, requests: list[GenRequest]) -> list['_Events']:
        """Submits every request or none, at once, so that a full queue is an HTTP 429 before
        any streaming starts; the events follow as the engine produces them. The requests
        passed `contract.check` in the HTTP front."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        reqs = [Request(r.prompt_ids, slot_settings(r, limits), self.tokenizer, tuple(r.stop),
                        r.logprobs or 0, matcher=matcher(r, self.tokenizer, limits))
                for r in requests]
        events = [_Events(req, r.logprobs is not None, loop) for req, r in zip(reqs, requests)]
        try:
            self.orchestrator.submit_all(reqs)
        except QueueFull as e:
            raise ApiError(429, str(e), code='queue_full', kind='rate_limit_error',
                           retry_after=RETRY_AFTER_S) from None
        except Draining as e:
            raise ApiError(503, str(e), kind='unavailable', retry_after=RETRY_AFTER_S) from None
        return events

    async def embed(self, prompts: list[list[int]]) -> np.ndarray:
        """On the engine thread, in its steps beside the streams: on the mesh and in lockstep."""
        try:
            future = self.orchestrator.embed(prompts)
        except Draining as e:
            raise ApiError(503, str(e), kind='unavailable', retry_after=RETRY_AFTER_S) from None
        try:
            return await asyncio.wrap_future(future)
        except Draining as e:
            raise ApiError(503, str(e), kind='unavailable', retry_after=RETRY_AFTER_S) from None
        except asyncio.CancelledError:
            self.orchestrator.cancel_embed(future)  # the client left: compute no more of it
            raise

    def stats(self) -> dict[str, float]:
        s = self.orchestrator.stats()
        # The engine's: pages used / pages (kv_cache_usage), prefix cache, drafts.
        return {'running': s['busy_slots'], 'waiting': s['queued'],
                **self.orchestrator.engine.metrics()}


class _Events:
    """The request's chunks as GenEvents, fed to an asyncio queue by the thread that emits
    them (no thread waits on an abandoned request). Closing it (or the client leaving, which
    cancels the task awaiting it) cancels the request; its slot is freed at the next step."""

    def __init__(self, req: Request, logprobs: bool, loop: asyncio.AbstractEventLoop):
        self.req, self.logprobs, self.done, self.first = req, logprobs, False, True
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        req.on_chunk = lambda chunk: loop.call_soon_threadsafe(self.queue.put_nowait, chunk)

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenEvent:
        if self.done:
            raise StopAsyncIteration
        try:
            chunk = await self.queue.get()
        except BaseException:
            self.req.cancel()
            raise
        self.done = chunk.finish_reason is not None
        if chunk.finish_reason == 'error':
            raise ApiError(500, f'the engine failed: {chunk.stop_reason}', kind='server_error')
        if chunk.finish_reason == 'unavailable':
            raise ApiError(503, f'the server cannot serve: {chunk.stop_reason}',
                           kind='unavailable', retry_after=RETRY_AFTER_S)
        if chunk.finish_reason == 'cancelled':
            if chunk.stop_reason == 'shutdown':
                raise ApiError(503, 'the server shut down before the request finished',
                               kind='unavailable', code='shutdown', retry_after=RETRY_AFTER_S)
            raise ApiError(499, 'the request was cancelled', code='cancelled')
        logprobs = None
        if self.logprobs:
            logprobs = [TokenLogprob(t, lp, list(top)) for t, lp, top in
                        zip(chunk.token_ids, chunk.logprobs, chunk.top)]
        queued = None
        if self.first and self.req.admitted is not None:
            queued = self.req.admitted - self.req.created
        self.first = False
        # The prompt's cached share is known from admission: on every event, so that an
        # answer cut short (safety_model) still reports it.
        return GenEvent(chunk.token_ids, chunk.text, logprobs, chunk.finish_reason, queued,
                        self.req.cached_tokens)

    async def aclose(self):
        self.done = True
        self.req.cancel()
