"""The gRPC service: Generate (server streaming), Tokenize, GetModelInfo; standard health and
reflection; optional bearer-token auth and TLS; graceful shutdown.

Health reports NOT_SERVING until the weights are loaded and every shape is compiled, and again
from the moment a shutdown begins.
"""

import concurrent.futures
import dataclasses
import json
import logging
import math
import queue
import random
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from glmjax.config import GlmConfig
from glmjax.serving import protos
from glmjax.serving.engine import MAX_STOP_IDS, Engine, SlotSettings
from glmjax.serving.orchestrator import Chunk, Draining, Orchestrator, QueueFull, Request
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.sampling import MAX_LOGIT_BIAS, TOP_LOGPROBS
from glmjax.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS = 16, 256
FINISH = {'stop': pb.STOP, 'length': pb.LENGTH, 'cancelled': pb.CANCELLED}


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f'{field}: {message}')


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(field, message)


def _number(value: float, field: str, low: float, high: float, low_open: bool = False):
    inside = low < value <= high if low_open else low <= value <= high
    interval = f'{"(" if low_open else "["}{low}, {high}]'
    _check(math.isfinite(value) and inside, field, f'must be in {interval}, got {value}')


@dataclasses.dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_seq_len: int
    eos_ids: tuple[int, ...]


def _prompt(msg, tokenizer: Tokenizer, limits: Limits) -> list[int]:
    _check(not (msg.text and msg.token_ids), 'prompt',
           "set exactly one of 'text' or 'token_ids', not both")
    ids = list(msg.token_ids) if msg.token_ids else tokenizer.encode(msg.text) if msg.text else []
    _check(len(ids) > 0, 'prompt', "empty: set 'text' or 'token_ids'")
    for i, t in enumerate(msg.token_ids):
        _check(0 <= t < limits.vocab_size, f'token_ids[{i}]',
               f'{t} is outside the vocabulary [0, {limits.vocab_size})')
    _check(len(ids) < limits.max_seq_len, 'prompt',
           f'{len(ids)} tokens leave no room to generate within the context limit '
           f'(max_seq_len) of {limits.max_seq_len} tokens')
    return ids


def _sampling(s, limits: Limits) -> dict:
    temperature = s.temperature if s.HasField('temperature') else 1.0
    top_p = s.top_p if s.HasField('top_p') else 1.0
    rp = s.repetition_penalty if s.HasField('repetition_penalty') else 1.0
    _number(temperature, 'sampling.temperature', 0.0, 1e4)
    _check(s.top_k >= 0, 'sampling.top_k', f'must be >= 0, got {s.top_k}')
    _number(top_p, 'sampling.top_p', 0.0, 1.0, low_open=True)
    _number(s.min_p, 'sampling.min_p', 0.0, 1.0)
    _number(rp, 'sampling.repetition_penalty', 0.0, 1e4, low_open=True)
    _number(s.presence_penalty, 'sampling.presence_penalty', -2.0, 2.0)
    _number(s.frequency_penalty, 'sampling.frequency_penalty', -2.0, 2.0)
    _check(len(s.logit_bias) <= MAX_LOGIT_BIAS, 'sampling.logit_bias',
           f'at most {MAX_LOGIT_BIAS} entries, got {len(s.logit_bias)}')
    for token, bias in s.logit_bias.items():
        _check(0 <= token < limits.vocab_size, 'sampling.logit_bias',
               f'token id {token} is outside the vocabulary [0, {limits.vocab_size})')
        _number(bias, f'sampling.logit_bias[{token}]', -100.0, 100.0)
    seed = s.seed if s.HasField('seed') else random.getrandbits(32)
    return dict(temperature=temperature, top_k=s.top_k, top_p=top_p, min_p=s.min_p,
                repetition_penalty=rp, presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty, seed=seed,
                logit_bias=tuple(sorted(s.logit_bias.items())))


def _stops(msg, limits: Limits) -> tuple[tuple[str, ...], tuple[int, ...]]:
    _check(len(msg.stop) <= MAX_STOP_STRINGS, 'stop',
           f'at most {MAX_STOP_STRINGS} stop strings, got {len(msg.stop)}')
    for i, s in enumerate(msg.stop):
        _check(0 < len(s) <= MAX_STOP_STRING_CHARS, f'stop[{i}]',
               f'must have 1 to {MAX_STOP_STRING_CHARS} characters, got {len(s)}')
    for i, t in enumerate(msg.stop_token_ids):
        _check(0 <= t < limits.vocab_size, f'stop_token_ids[{i}]',
               f'{t} is outside the vocabulary [0, {limits.vocab_size})')
    ids = tuple(dict.fromkeys((() if msg.ignore_eos else limits.eos_ids)
                              + tuple(msg.stop_token_ids)))
    _check(len(ids) <= MAX_STOP_IDS, 'stop_token_ids',
           f'at most {MAX_STOP_IDS} stop ids with the model eos ids, got {len(ids)}')
    return tuple(msg.stop), ids


def build_request(msg, tokenizer: Tokenizer, limits: Limits,
                  deadline: float | None = None) -> Request:
    """Checks every field of a GenerateRequest; InvalidRequest names the one at fault."""
    prompt = _prompt(msg, tokenizer, limits)
    room = limits.max_seq_len - len(prompt)
    _check(msg.max_tokens >= 0, 'max_tokens', f'must be >= 0, got {msg.max_tokens}')
    _check(msg.max_tokens <= room, 'max_tokens',
           f'prompt of {len(prompt)} tokens + max_tokens {msg.max_tokens} exceeds the context '
           f'limit (max_seq_len) of {limits.max_seq_len} tokens')
    _check(0 <= msg.top_logprobs <= TOP_LOGPROBS, 'top_logprobs',
           f'must be between 0 and {TOP_LOGPROBS}, got {msg.top_logprobs}')
    sampling = _sampling(msg.sampling, limits)
    stop_strings, stop_ids = _stops(msg, limits)
    settings = SlotSettings(max_new=msg.max_tokens or room, stop_ids=stop_ids, **sampling)
    return Request(prompt, settings, tokenizer, stop_strings, msg.top_logprobs, deadline)


def _response(chunk: Chunk, with_logprobs: bool):
    r = pb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text,
                            stop_reason=chunk.stop_reason)
    if with_logprobs:
        for t, lp, top in zip(chunk.token_ids, chunk.logprobs, chunk.top):
            r.logprobs.add(token_id=t, logprob=lp,
                           top=[pb.TopLogprob(token_id=i, logprob=p) for i, p in top])
    if chunk.finish_reason:
        r.finish_reason = FINISH[chunk.finish_reason]
        r.usage.prompt_tokens = chunk.prompt_tokens
        r.usage.completion_tokens = chunk.completion_tokens
    return r


class GlmServicer(pb_grpc.GlmServicer):
    def __init__(self, server: 'GlmServer'):
        self.s = server

    def Generate(self, request, context):
        self.s.check_ready(context)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            req = build_request(request, self.s.tokenizer, self.s.limits, deadline)
            self.s.orchestrator.submit(req)
        except InvalidRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Draining as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        context.add_callback(req.cancel)  # client gone or deadline passed: free the slot
        with_logprobs = request.logprobs or request.top_logprobs > 0
        while True:
            try:
                chunk = req.out.get(timeout=0.1)
            except queue.Empty:
                if not context.is_active():
                    req.cancel()
                    return
                continue
            if chunk.finish_reason == 'error':
                context.abort(grpc.StatusCode.INTERNAL, chunk.stop_reason)
            if chunk.finish_reason == 'unavailable':
                context.abort(grpc.StatusCode.UNAVAILABLE, chunk.stop_reason)
            if chunk.finish_reason == 'cancelled' and context.is_active():
                # Only a server shutdown cancels a request whose client is still there.
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              'the server shut down before the request finished')
            yield _response(chunk, with_logprobs)
            if chunk.finish_reason:
                return

    def Tokenize(self, request, context):
        ids = self.s.tokenizer.encode(request.text)
        return pb.TokenizeResponse(token_ids=ids, tokens=self.s.tokenizer.token_strings(ids))

    def GetModelInfo(self, request, context):
        e = self.s.engine
        return pb.ModelInfo(
            model_name=self.s.model_name, config_json=json.dumps(dataclasses.asdict(self.s.cfg)),
            vocab_size=self.s.cfg.vocab_size, max_seq_len=e.max_seq_len, max_batch=e.max_batch,
            max_queue=self.s.orchestrator.max_queue, eos_token_ids=self.s.limits.eos_ids,
            prefill_buckets=getattr(e, 'buckets', ()), decode_steps_per_call=e.steps_per_call,
            **self.s.orchestrator.stats())


class BearerAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <key>` on every call but health checks."""

    def __init__(self, key: str):
        self.expected = f'Bearer {key}'

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith('/grpc.health.v1.Health/'):
            return handler
        got = dict(details.invocation_metadata).get('authorization')
        if got == self.expected:
            return handler
        message = ('missing authorization metadata: send "authorization: Bearer <key>"'
                   if got is None else 'wrong API key')

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        def deny_stream(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # a generator, as the streaming handler it replaces

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            deny, handler.request_deserializer, handler.response_serializer)


class GlmServer:
    """The gRPC server around one engine. start() listens at once (health NOT_SERVING);
    warmup() compiles and turns health to SERVING; shutdown() drains then stops."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, cfg: GlmConfig, model_name: str,
                 max_queue: int, host: str = '127.0.0.1', port: int = 0,
                 api_key: str | None = None, tls: tuple[bytes, bytes] | None = None):
        eos = cfg.eos_token_ids
        self.engine, self.tokenizer, self.cfg, self.model_name = engine, tokenizer, cfg, model_name
        self.limits = Limits(cfg.vocab_size, engine.max_seq_len, tuple(eos))
        self.orchestrator = Orchestrator(engine, max_queue)
        self.ready = self.stopping = False
        self.failure: str | None = None
        workers = engine.max_batch + max_queue + 8  # every waiting stream holds a thread
        self.grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='glmjax-grpc'),
            interceptors=[BearerAuth(api_key)] if api_key else [])
        pb_grpc.add_GlmServicer_to_server(GlmServicer(self), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (pb.DESCRIPTOR.services_by_name['Glm'].full_name,
                 health_pb2.DESCRIPTOR.services_by_name['Health'].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f'{host}:{port}'
        if tls:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])  # (key, cert)
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f'could not listen on {address}')

    def _set_health(self, status) -> None:
        for name in ('', protos.SERVICE_NAME):
            self.health.set(name, status)

    def check_ready(self, context) -> None:
        if self.failure is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f'the server cannot serve: {self.failure}')
        if not self.ready:
            context.abort(grpc.StatusCode.UNAVAILABLE, 'the model is still loading')

    def start(self) -> 'GlmServer':
        self.grpc.start()
        return self

    def warmup(self) -> None:
        self.engine.warmup()
        self.orchestrator.start()
        self.ready = True
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def fail(self, message: str) -> None:
        """The engine is lost for good (a process of the mesh is gone): health NOT_SERVING,
        every request in flight UNAVAILABLE with `message`, new ones refused."""
        self.ready = False
        self.failure = message
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.orchestrator.abort(message)

    def shutdown(self, grace: float) -> bool:
        """Stops admission (UNAVAILABLE), lets in-flight requests finish for up to `grace`
        seconds, cancels the rest, then stops. Returns whether everything finished."""
        self.stopping = True  # the HTTP front's /health turns 503 with gRPC health
        self.health.enter_graceful_shutdown()
        drained = self.orchestrator.drain(grace)
        self.orchestrator.close()
        self.grpc.stop(grace=2).wait()
        return drained
