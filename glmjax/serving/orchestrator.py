"""The orchestrator: owns the request queue, the decode slots and two threads.

    gRPC handler threads (one per RPC)
        |  submit(Request): already validated and tokenized. Bounded: when busy slots plus
        |  waiting requests reach max_batch + max_queue, QueueFull at once.
        v
    pending deque (lock + condition)
        |
    engine thread (the only thread that calls the Engine) --------> device
        loop: free the slots of finished, cancelled and expired requests   (engine.free)
              admit waiting requests into free slots          (engine.prefill, .insert)
              dispatch engine.generate(): steps_per_call tokens for every slot, async
              fetch the PREVIOUS call's tokens: the device is already running the next
              call, so the host trails by one call and never stalls the device loop;
              while some request is constrained, each call is one step whose token
              bitmasks follow from the previous call's tokens: the engine dispatches the
              step's forward, then asks for the masks (the host fetches those tokens and
              fills them while the forward runs), then dispatches its sampling
        |  (request, tokens, logprobs) items
        v
    detokenize queue (unbounded: the engine thread never waits on it)
        |
    detokenize thread
        per request: stop token ids, incremental detokenizer, stop strings, max_tokens;
        puts Chunks on the request's own output queue; a finished request's slot is freed
        by the engine thread at its next iteration
        v
    request.out queue -> its gRPC handler thread streams each Chunk as a response

Cancellation (client gone, deadline passed, shutdown) only sets a flag on the request, with
its cause; the engine thread frees its slot at its next iteration, and a request that is
over leaves the queue at once (it no longer counts against max_queue). The final chunk of a
cancelled request carries the cause, so each API can answer with the status it deserves.

Embedding calls (`embed`, a future) go to the engine at the engine thread's next iteration
(engine.embed_begin): their inputs are computed by the following generate calls, as chunks
beside the running streams, and each call's future gets its vectors once the device is done
with them (engine.embed_results). A call whose client leaves (`cancel_embed`) is dropped
there, whether or not it has begun.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import uuid

import jax
import numpy as np

from glmjax.serving.engine import Engine, EngineLost, SlotSettings, StepOutput
from glmjax.serving.stops import StopMatcher
from glmjax.serving.tokenizer import IncrementalDetokenizer, Tokenizer
from glmjax.token_mask import bitmask_words

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


CANCEL_CAUSES = ('client', 'deadline', 'shutdown')


class Draining(Exception):
    pass


@dataclasses.dataclass
class Chunk:
    """What one response carries: the tokens of one engine call for one request."""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ''
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # 'stop', 'length', 'cancelled', 'error', 'unavailable'
    # The stop string or token id; the message for 'error' and 'unavailable'; for
    # 'cancelled' the cause: 'client', 'deadline' or 'shutdown'.
    stop_reason: str = ''
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, from the prefix cache (on the last chunk)


class Request:
    def __init__(self, prompt: list[int], settings: SlotSettings, tokenizer: Tokenizer,
                 stop_strings: tuple[str, ...] = (), top_logprobs: int = 0,
                 deadline: float | None = None, matcher=None):
        self.prompt, self.settings, self.top_logprobs = prompt, settings, top_logprobs
        # Constrained decoding (glmjax.serving.constraints): fills each next token's bitmask
        # and follows the tokens; used by the engine thread only.
        self.matcher = matcher
        self.deadline = deadline  # time.monotonic() value, or None
        self.id = uuid.uuid4().hex[:16]  # in logs, and in the message of an internal error
        self.created, self.admitted = time.monotonic(), None  # queue time, for metrics
        self.out: queue.Queue[Chunk] = queue.Queue()
        # Called with each chunk as it is queued, from whichever thread emits it (the HTTP
        # front wakes its event loop with it instead of polling the queue).
        self.on_chunk = None
        self.cancelled = False
        self.cancel_cause = ''
        self.device_done = False  # the device stopped this slot (stop id or max_new)
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0
        # Used by the detokenize thread only.
        self.stop_ids = frozenset(settings.stop_ids)
        self.detok = IncrementalDetokenizer(tokenizer, prompt)
        self.stops = StopMatcher(list(stop_strings))
        self._lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self, cause: str = 'client') -> None:
        assert cause in CANCEL_CAUSES, cause
        if not self.cancelled:
            self.cancel_cause, self.cancelled = cause, True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def over(self, now: float, closing: bool) -> str | None:
        """Why the request must stop now (a cancellation cause), or None."""
        if self.cancelled:
            return self.cancel_cause
        if self.expired(now):
            return 'deadline'
        return 'shutdown' if closing else None

    def emit(self, chunk: Chunk) -> bool:
        """Queues a chunk unless the request already finished; a chunk with a finish
        reason finishes it. Returns whether the chunk went out."""
        with self._lock:
            if self.finished:
                return False
            if chunk.finish_reason:
                self.finish_reason = chunk.finish_reason
                chunk.prompt_tokens = len(self.prompt)
                chunk.completion_tokens = self.completion_tokens
                chunk.cached_tokens = self.cached_tokens
            self.out.put(chunk)
            hook = self.on_chunk
        if hook is not None:
            try:
                hook(chunk)
            except Exception:  # e.g. the HTTP event loop is gone: never the engine's problem
                log.exception('request %s: chunk hook failed', self.id)
        return True

    def finish(self, reason: str, message: str = '') -> bool:
        return self.emit(Chunk(finish_reason=reason, stop_reason=message))


@dataclasses.dataclass(eq=False)  # one call is one object: `in` by identity
class _EmbedCall:
    """An embedding call: its inputs and its future."""
    prompts: list[list[int]]
    future: concurrent.futures.Future
    abandoned: bool = False  # its client left (cancel_embed)


class Orchestrator:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._slots: list[Request | None] = [None] * engine.max_batch
        self._pending: collections.deque[Request] = collections.deque()
        # Embedding calls the engine thread has yet to begin, and those it has begun, by id
        # (the engine computes them in its steps, on the mesh and in lockstep like every
        # other engine call).
        self._embeds: collections.deque[_EmbedCall] = collections.deque()
        self._embedding: dict[int, _EmbedCall] = {}
        self._cond = threading.Condition()
        self._detok_queue: queue.Queue = queue.Queue()
        self._closing = self._draining = False
        self._lost: str | None = None  # why the engine cannot go on (see abort)
        self._threads = [threading.Thread(target=self._engine_loop, name='glmjax-engine'),
                         threading.Thread(target=self._detok_loop, name='glmjax-detokenize')]

    # ---- called from any thread ----

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, req: Request) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[Request]) -> None:
        """Queues every request or none (QueueFull, Draining): the `n` choices of one HTTP
        request are admitted together."""
        with self._cond:
            if self._lost is not None:
                raise Draining(f'the server cannot serve: {self._lost}')
            if self._draining or self._closing:
                raise Draining('the server is shutting down and accepts no new requests')
            self._prune_pending()
            # A request that is over no longer counts, though its slot frees at the next step.
            now = time.monotonic()
            busy = sum(s is not None and s.over(now, False) is None for s in self._slots)
            capacity = self.engine.max_batch + self.max_queue
            if busy + len(self._pending) + len(reqs) > capacity:
                raise QueueFull(f'all {self.engine.max_batch} slots are busy and the queue '
                                f'holds its maximum of {self.max_queue} requests'
                                + (f' (this request needs {len(reqs)})' if len(reqs) > 1
                                   else ''))
            self._pending.extend(reqs)
            self._cond.notify_all()

    def _prune_pending(self) -> None:
        """Ends the waiting requests that are over (cancelled, expired), so that they stop
        counting against the queue at once. Called with the lock held."""
        now = time.monotonic()
        live = collections.deque()
        for req in self._pending:
            cause = req.over(now, self._closing)
            if cause is None:
                live.append(req)
            else:
                req.finish('cancelled', cause)
        if len(live) != len(self._pending):
            self._pending = live
            self._cond.notify_all()

    def embed(self, prompts: list[list[int]]) -> concurrent.futures.Future:
        """Queues an embedding call; the future holds its [len(prompts), D] array."""
        future = concurrent.futures.Future()
        with self._cond:
            if self._lost is not None:
                raise Draining(f'the server cannot serve: {self._lost}')
            if self._draining or self._closing:
                raise Draining('the server is shutting down and accepts no new requests')
            self._embeds.append(_EmbedCall(prompts, future))
            self._cond.notify_all()
        return future

    def cancel_embed(self, future: concurrent.futures.Future) -> None:
        """The client of this embedding call left: whatever of it is not computed yet is not."""
        with self._cond:
            for call in list(self._embeds) + list(self._embedding.values()):
                if call.future is future:
                    call.abandoned = True
            future.cancel()  # ends it at once if it has not begun

    def _fail_embeds(self, message: str) -> None:
        """Called with the lock held: every embedding call, begun or not, ends Draining."""
        for call in self._embeds:  # one may be running: being begun
            f = call.future
            if not f.done() and (f.running() or f.set_running_or_notify_cancel()):
                f.set_exception(Draining(message))
        self._embeds.clear()
        self._end_begun(Draining(message))

    def _end_begun(self, error: Exception) -> None:
        """Called with the lock held: the begun embedding calls end with `error`."""
        for call in self._embedding.values():
            if not call.future.done():
                call.future.set_exception(error)
        self._embedding.clear()

    def stats(self) -> dict[str, int]:
        with self._cond:
            busy = sum(s is not None for s in self._slots)
            return {'busy_slots': busy, 'free_slots': len(self._slots) - busy,
                    'queued': len(self._pending)}

    def drain(self, timeout: float) -> bool:
        """Stops admission; waits up to timeout for every request to finish."""
        end = time.monotonic() + timeout
        with self._cond:
            self._draining = True
            return self._cond.wait_for(self._idle, timeout=max(0.0, end - time.monotonic()))

    def abort(self, message: str) -> None:
        """The engine is gone for good (a process of the mesh died): every request waiting
        or in flight ends 'unavailable' now, new ones are refused, the engine thread stops.
        Safe from any thread, even while the engine thread is stuck in a device call."""
        with self._cond:
            if self._lost is not None:
                return
            self._lost = message
            for req in list(self._pending) + [s for s in self._slots if s is not None]:
                req.finish('unavailable', message)
            self._pending.clear()
            self._slots = [None] * len(self._slots)
            self._fail_embeds(f'the server cannot serve: {message}')
            self._cond.notify_all()

    def close(self) -> None:
        """Cancels whatever is left and stops the threads."""
        with self._cond:
            self._closing = True
            for req in list(self._pending) + [s for s in self._slots if s is not None]:
                req.cancel('shutdown')
            self._fail_embeds('the server shut down before the request finished')
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=30)

    def _idle(self) -> bool:
        return (not self._pending and not self._embeds and not self._embedding
                and all(s is None for s in self._slots))

    # ---- the engine thread ----

    def _engine_loop(self) -> None:
        previous: list[tuple[StepOutput, list[Request | None]]] = []
        while True:
            with self._cond:
                if self._lost is not None or (self._closing and self._idle() and not previous):
                    break
                if not previous and self._idle():
                    self._cond.wait(timeout=0.1)
                    continue
            try:
                previous = self._step(previous)
            except Exception as e:
                # A device call can fail because a process of the mesh is gone: then stop.
                lost = str(e) if isinstance(e, EngineLost) else self.engine.lost()
                if lost is not None:
                    log.error('engine lost: %s', lost)
                    self.abort(lost)
                    break
                # Otherwise keep serving: fail the requests in flight, not the server.
                log.exception('engine step failed')
                previous = []
                self._fail_all(f'engine error: {type(e).__name__}: {e}')
        self._detok_queue.put(None)

    def _step(self, previous: list) -> list[tuple[StepOutput, list[Request | None]]]:
        """Dispatches the next call and hands the previous one's tokens on, once the device
        has the new call to run. While some request is constrained that is from inside the
        call, between its forward and its sampling: the masks follow from those tokens."""
        with self._cond:
            self._prune_pending()
        self._begin_embeds()
        self._release()
        self._admit()
        with self._cond:
            snapshot = list(self._slots)
        if not any(r is not None for r in snapshot) and not self.engine.embedding_work:
            self._emit(previous)
            self._end_embeds(block=True)  # nothing else to run: wait for the device
            return []
        # device_done is as of the call before `previous`: a request done in `previous`
        # still counts, which costs the others at most one more one-step call.
        if not any(self._constrained(r) for r in snapshot):
            out = self.engine.generate()
            self._emit(previous)
        else:
            asked = []

            def masks() -> np.ndarray:
                asked.append(True)
                self._emit(previous)
                return self._masks(snapshot)

            out = self.engine.generate(masks)
            if not asked:  # an engine that had nothing to compute: the tokens must not be lost
                self._emit(previous)
        self._end_embeds(block=False)
        # Before this call's tokens are emitted, so the request's last chunk carries it.
        for slot, req in enumerate(snapshot):
            if req is not None:
                req.cached_tokens = self.engine.cached_tokens(slot)
        return [(out, snapshot)]

    @staticmethod
    def _constrained(req: Request | None) -> bool:
        return req is not None and req.matcher is not None and not req.device_done

    def _masks(self, slots: list[Request | None]) -> np.ndarray:
        """The bitmask of every slot's next token: a constrained request's from its matcher,
        every token for the others."""
        allowed = np.full((len(slots), bitmask_words(self.engine.vocab_size)), -1, np.int32)
        for s, r in enumerate(slots):
            if self._constrained(r):
                r.matcher.fill(allowed, s)
        return allowed

    def _begin_embeds(self) -> None:
        """Hands the queued embedding calls to the engine, and drops the begun ones whose
        client left."""
        with self._cond:
            calls = list(self._embeds)
            gone = [k for k, c in self._embedding.items() if c.abandoned]
        for key in gone:
            self.engine.embed_cancel(key)
            with self._cond:
                if (call := self._embedding.pop(key, None)) is not None:
                    call.future.set_exception(concurrent.futures.CancelledError())
        for call in calls:
            # A call stays queued until it is begun, so that cancel_embed always finds it.
            if call.abandoned or not call.future.set_running_or_notify_cancel():
                with self._cond:
                    if call in self._embeds:
                        self._embeds.remove(call)  # the client left before it began
                continue
            try:
                key = self.engine.embed_begin(call.prompts)
            except Exception as e:
                with self._cond:
                    if call in self._embeds:
                        self._embeds.remove(call)
                        call.future.set_exception(e)
                if isinstance(e, EngineLost) or self.engine.lost() is not None:
                    raise
                log.exception('embedding call failed to begin')
                continue
            with self._cond:
                if call not in self._embeds:  # abort or close ended it meanwhile
                    self.engine.embed_cancel(key)
                else:
                    self._embeds.remove(call)
                    self._embedding[key] = call

    def _end_embeds(self, block: bool) -> None:
        """Sets the futures of the embedding calls the device is done with (with `block`,
        waits for all those computed)."""
        if not self._embedding:
            return
        for key, vectors in self.engine.embed_results(block):
            with self._cond:
                call = self._embedding.pop(key, None)
                if call is not None:
                    call.future.set_result(vectors)
                self._cond.notify_all()

    def _release(self) -> None:
        """Frees the slots of requests that are over, for whatever reason."""
        now = time.monotonic()
        for slot, req in enumerate(self._slots):
            if req is None:
                continue
            cause = req.over(now, self._closing)
            if not (cause or req.finished or req.device_done):
                continue
            if cause:
                req.finish('cancelled', cause)
            self.engine.free(slot)
            with self._cond:
                self._slots[slot] = None
                self._cond.notify_all()

    def _next_pending(self) -> Request | None:
        """Pops the next live request if the engine can take it now (else it waits, first
        in line); cancelled and expired ones are dropped here."""
        now = time.monotonic()
        with self._cond:
            while self._pending:
                req = self._pending[0]
                cause = req.over(now, self._closing)
                if cause:
                    self._pending.popleft()
                    req.finish('cancelled', cause)
                    self._cond.notify_all()
                    continue
                if not self.engine.can_admit(req.prompt, req.settings.max_new):
                    return None
                return self._pending.popleft()
            return None

    def _admit(self) -> None:
        """Binds waiting requests to free slots; their prompts are computed by the next
        generate calls, which also sample their first tokens."""
        for slot in range(len(self._slots)):
            if self._slots[slot] is not None:
                continue
            req = self._next_pending()
            if req is None:
                break
            req.admitted = time.monotonic()
            try:
                prefix = self.engine.prefill(req.prompt)
                req.cached_tokens = prefix.cached_tokens
                self.engine.insert(prefix, slot, req.settings)
            except Exception as e:
                if isinstance(e, EngineLost) or self.engine.lost() is not None:
                    raise
                # This request alone fails (the decode state is only replaced when insert
                # returns, so the other slots are untouched).
                log.exception('request %s failed to start', req.id)
                req.finish('error', f'request {req.id} failed to start: '
                           f'{type(e).__name__}: {e}')
                continue
            with self._cond:
                if self._lost is not None:  # aborted while this request was being admitted
                    req.finish('unavailable', self._lost)
                    break
                self._slots[slot] = req

    def _emit(self, outputs: list[tuple[StepOutput, list[Request | None]]]) -> None:
        """Fetches finished calls and hands their tokens to the detokenize thread."""
        if not outputs:
            return
        host = jax.device_get([out for out, _ in outputs])
        for out, reqs in zip(host, (r for _, r in outputs)):
            for row, req in enumerate(reqs):
                if req is None or not out.valid[row].any():
                    continue
                keep = out.valid[row]
                if req.matcher is not None and not all(
                        req.matcher.accept(t) for t in out.tokens[row][keep].tolist()):
                    # The mask allowed the token, so the grammar should have: a bug, not
                    # something to hide by going on.
                    log.error('request %s: a sampled token broke its constraint', req.id)
                    req.finish('error', f'request {req.id}: a sampled token broke its '
                               f'output constraint')
                    continue
                self._detok_queue.put((req, out.tokens[row][keep], out.logprobs[row][keep],
                                       out.top_ids[row][keep], out.top_logprobs[row][keep]))
                if out.done[row]:
                    req.device_done = True

    def _fail_all(self, message: str) -> None:
        with self._cond:
            self._end_begun(RuntimeError(message))  # the engine's reset drops them
            for slot, req in enumerate(self._slots):
                if req is not None:
                    req.finish('error', message)
                    self._slots[slot] = None
            self._cond.notify_all()
        try:
            self.engine.reset()
        except Exception:
            log.exception('engine reset failed')

    # ---- the detokenize thread ----

    def _detok_loop(self) -> None:
        while (item := self._detok_queue.get()) is not None:
            try:
                self._detokenize(*item)
            except Exception as e:
                log.exception('detokenize failed')
                item[0].finish('error', f'detokenize error: {type(e).__name__}: {e}')

    def _detokenize(self, req: Request, tokens: np.ndarray, logprobs: np.ndarray,
                    top_ids: np.ndarray, top_lps: np.ndarray) -> None:
        if req.finished:
            return
        chunk = Chunk()
        for t, lp, ids, lps in zip(tokens.tolist(), logprobs.tolist(), top_ids.tolist(),
                                   top_lps.tolist()):
            req.completion_tokens += 1
            chunk.token_ids.append(t)
            chunk.logprobs.append(lp)
            chunk.top.append(list(zip(ids, lps))[:req.top_logprobs])
            if t in req.stop_ids:
                chunk.finish_reason, chunk.stop_reason = 'stop', str(t)
                break
            chunk.text += req.stops.feed(req.detok.add(t))
            if req.stops.matched is not None:
                chunk.finish_reason, chunk.stop_reason = 'stop', req.stops.matched
                break
            if req.completion_tokens >= req.settings.max_new:
                chunk.finish_reason = 'length'
                break
        if chunk.finish_reason:
            chunk.text += self._flush(req)
            if req.stops.matched is not None:
                chunk.finish_reason, chunk.stop_reason = 'stop', req.stops.matched
        req.emit(chunk)

    @staticmethod
    def _flush(req: Request) -> str:
        """The text held back for a possible multi-byte character or stop string."""
        return req.stops.feed(req.detok.flush()) + req.stops.flush()
