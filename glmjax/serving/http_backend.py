"""The engine behind the HTTP API: the same orchestrator (slots, queue, threads) that serves
gRPC, seen as the async `Backend` that serving/openai_api.py talks to."""

import asyncio
import functools
import queue
import random
import threading

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.config import GlmConfig
from glmjax.generate import bucket
from glmjax.inference import hidden_states
from glmjax.serving.chat import ChatTemplate
from glmjax.serving.engine import MAX_STOP_IDS, SlotSettings
from glmjax.serving.openai_api import ApiError, GenEvent, GenRequest, TokenLogprob
from glmjax.serving.orchestrator import Draining, Orchestrator, QueueFull, Request
from glmjax.serving.sampling import MAX_LOGIT_BIAS, TOP_LOGPROBS
from glmjax.serving.tokenizer import Tokenizer


class EngineBackend:
    def __init__(self, orchestrator: Orchestrator, tokenizer: Tokenizer, cfg: GlmConfig,
                 params: dict, model_name: str, max_seq_len: int, chat_template: ChatTemplate,
                 ready=lambda: True):
        self.orchestrator, self.tokenizer, self.cfg, self.params = (
            orchestrator, tokenizer, cfg, params)
        self.model_name, self.max_context, self.chat_template = (
            model_name, max_seq_len, chat_template)
        self.vocab_size = cfg.vocab_size
        self.ready = ready
        self._embed_lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _request(self, r: GenRequest) -> Request:
        stop_ids = () if r.ignore_eos else tuple(self.cfg.eos_token_ids)[:MAX_STOP_IDS]
        if len(r.logit_bias) > MAX_LOGIT_BIAS:
            raise ApiError(400, f'logit_bias has {len(r.logit_bias)} entries; at most '
                           f'{MAX_LOGIT_BIAS}', 'logit_bias')
        settings = SlotSettings(
            max_new=r.max_tokens, stop_ids=stop_ids, temperature=r.temperature, top_k=r.top_k,
            top_p=r.top_p, min_p=r.min_p, repetition_penalty=r.repetition_penalty,
            presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
            seed=random.getrandbits(32) if r.seed is None else r.seed % 2**32,
            logit_bias=tuple(sorted(r.logit_bias.items())))
        top = 0 if r.logprobs is None else min(r.logprobs, TOP_LOGPROBS)
        return Request(r.prompt_ids, settings, self.tokenizer, tuple(r.stop), top)

    def generate(self, r: GenRequest) -> '_Events':
        """Submits at once, so that a full queue is an HTTP 429 before any streaming starts;
        the events follow as the engine produces them."""
        req = self._request(r)
        try:
            self.orchestrator.submit(req)
        except QueueFull as e:
            raise ApiError(429, str(e), code='queue_full', kind='rate_limit_error') from None
        except Draining as e:
            raise ApiError(503, str(e), kind='unavailable') from None
        return _Events(req, r.logprobs is not None)

    async def embed(self, prompts: list[list[int]]) -> np.ndarray:
        return await asyncio.to_thread(self._embed, prompts)

    def _embed(self, prompts: list[list[int]]) -> np.ndarray:
        """Mean of the final hidden states over each prompt's tokens, L2-normalised."""
        T = bucket(max(len(p) for p in prompts))
        tokens = np.zeros((len(prompts), T), np.int32)
        mask = np.zeros((len(prompts), T, 1), np.float32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)], mask[i, :len(p)] = p, 1.0
        with self._embed_lock:  # one embedding batch at a time beside the engine
            h = _pooled(self.cfg, self.params, jnp.asarray(tokens), jnp.asarray(mask))
        return np.asarray(h)

    def stats(self) -> dict[str, float]:
        s = self.orchestrator.stats()
        slots = s['busy_slots'] + s['free_slots']
        return {'running': s['busy_slots'], 'waiting': s['queued'],
                'kv_cache_usage': s['busy_slots'] / slots if slots else 0.0}


class _Events:
    """The request's chunks as GenEvents. Closing it (or the client leaving, which cancels
    the task awaiting it) cancels the request, and its slot is freed at the next step."""

    def __init__(self, req: Request, logprobs: bool):
        self.req, self.logprobs, self.done, self.first = req, logprobs, False, True

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenEvent:
        if self.done:
            raise StopAsyncIteration
        try:
            chunk = await self._next_chunk()
        except BaseException:
            self.req.cancel()
            raise
        if chunk.finish_reason == 'error':
            self.done = True
            raise ApiError(503, f'the engine failed: {chunk.stop_reason}', kind='server_error')
        if chunk.finish_reason == 'unavailable':
            self.done = True
            raise ApiError(503, f'the server cannot serve: {chunk.stop_reason}',
                           kind='unavailable')
        self.done = chunk.finish_reason is not None
        logprobs = None
        if self.logprobs:
            logprobs = [TokenLogprob(t, lp, list(top)) for t, lp, top in
                        zip(chunk.token_ids, chunk.logprobs, chunk.top)]
        finish = chunk.finish_reason
        finish = finish if finish in (None, 'stop', 'length') else 'stop'
        queued = None
        if self.first and self.req.admitted is not None:
            queued = self.req.admitted - self.req.created
        self.first = False
        return GenEvent(chunk.token_ids, chunk.text, logprobs, finish, queued)

    async def _next_chunk(self):
        while True:  # short waits: a thread never stays blocked on an abandoned request
            try:
                return await asyncio.to_thread(self.req.out.get, True, 0.5)
            except queue.Empty:
                continue

    async def aclose(self):
        self.done = True
        self.req.cancel()


@functools.partial(jax.jit, static_argnums=0)
def _pooled(cfg, params, tokens, mask):
    # Causal attention: right padding never changes the real tokens' states.
    h = hidden_states(cfg, params, tokens).astype(jnp.float32)
    pooled = (h * mask).sum(1) / mask.sum(1)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
