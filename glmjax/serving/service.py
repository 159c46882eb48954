"""The gRPC service: Generate (server streaming), Tokenize, GetModelInfo; standard health and
reflection; optional bearer-token auth and TLS; graceful shutdown.

Health reports NOT_SERVING until the weights are loaded and every shape is compiled, and again
from the moment a shutdown begins.
"""

import concurrent.futures
import dataclasses
import hmac
import json
import logging
import queue
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from glmjax.config import GlmConfig
from glmjax.serving import protos
from glmjax.serving.chat import ChatTemplate
from glmjax.serving.constraints import ConstraintSpec, UnsupportedConstraint
from glmjax.serving.contract import (
    GenRequest,
    InvalidRequest,
    Limits,
    check,
    constraint_compiler,
    matcher,
    slot_settings,
    starts_in_reasoning,
)
from glmjax.serving.engine import Engine
from glmjax.serving.moderation import (
    Classifier,
    Moderation,
    Refusal,
    Screen,
    category,
    conversation,
)
from glmjax.serving.orchestrator import Chunk, Draining, Orchestrator, QueueFull, Request
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FINISH = {'stop': pb.STOP, 'length': pb.LENGTH, 'cancelled': pb.CANCELLED,
          'content_filter': pb.CONTENT_FILTER}
ERROR_CODE_KEY = 'glmjax-error-code'  # trailing metadata: why a request was refused


class _Gone(Exception):
    """The client left, or its deadline passed: nothing more is sent."""


def _spec(make, field: str) -> ConstraintSpec:
    try:
        return make()
    except UnsupportedConstraint as e:  # a malformed value
        raise InvalidRequest(field, str(e)) from None


def _json_object(text: str, field: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(field, f'not valid JSON: {e}') from None
    if not isinstance(value, dict):
        raise InvalidRequest(field, 'must be a JSON schema (an object)')
    return value


def constraint_of(msg) -> ConstraintSpec | None:
    """The `constraint` oneof of a GenerateRequest; InvalidRequest names the member at
    fault (tool_call.tools[i]... inside a tool call)."""
    kind = msg.WhichOneof('constraint')
    if kind is None:
        return None
    if kind == 'json_schema':
        schema = _json_object(msg.json_schema, kind)
        return _spec(lambda: ConstraintSpec.json_schema(schema), kind)
    if kind == 'json_object':
        if not msg.json_object:
            raise InvalidRequest(kind, 'set it to true, or leave the constraint unset')
        return ConstraintSpec.json_object()
    if kind == 'regex':
        return _spec(lambda: ConstraintSpec.regex(msg.regex), kind)
    if kind == 'choice':
        return _spec(lambda: ConstraintSpec.choice(list(msg.choice.choices)), kind)
    if kind == 'grammar':
        return _spec(lambda: ConstraintSpec.grammar(msg.grammar), kind)
    call = msg.tool_call  # tool_call
    tools = [{'name': t.name, 'parameters': _json_object(
        t.parameters, f'tool_call.tools[{i}].parameters') if t.parameters else None}
        for i, t in enumerate(call.tools)]
    try:
        return ConstraintSpec.tool_call(tools, call.name or None)
    except UnsupportedConstraint as e:
        where = 'tool_call.name' if e.feature == 'tool_choice' else f'tool_call.{e.feature}'
        raise InvalidRequest(where, str(e)) from None


def gen_request(msg, tokenizer: Tokenizer) -> GenRequest:
    """The GenerateRequest as the one request type; `contract.check` validates it."""
    if msg.text and msg.token_ids:
        raise InvalidRequest('prompt', "set exactly one of 'text' or 'token_ids', not both")
    if not msg.text and not msg.token_ids:
        raise InvalidRequest('prompt', "empty: set 'text' or 'token_ids'")
    s = msg.sampling
    ids = list(msg.token_ids) if msg.token_ids else tokenizer.encode(msg.text)
    constraint = constraint_of(msg)
    budget = msg.reasoning_budget if msg.HasField('reasoning_budget') else None
    # Whether the model reasons first, from the prompt as both APIs decide it (only asked
    # when it matters: decoding a long token prompt is not free). Ids outside the vocabulary
    # cannot be decoded; `check` refuses them.
    reasoning = (constraint is not None or budget is not None) and starts_in_reasoning(
        msg.text or tokenizer.decode([t for t in ids if 0 <= t < tokenizer.vocab_size]))
    return GenRequest(
        prompt_ids=ids, max_tokens=msg.max_tokens or None,
        temperature=s.temperature if s.HasField('temperature') else 1.0,
        top_p=s.top_p if s.HasField('top_p') else 1.0, top_k=s.top_k, min_p=s.min_p,
        repetition_penalty=s.repetition_penalty if s.HasField('repetition_penalty') else 1.0,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        logit_bias=dict(s.logit_bias), seed=s.seed if s.HasField('seed') else None,
        stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids),
        logprobs=msg.top_logprobs if (msg.logprobs or msg.top_logprobs) else None,
        ignore_eos=msg.ignore_eos, constraint=constraint, reasoning=reasoning,
        reasoning_budget=budget)


def build_request(msg, tokenizer: Tokenizer, limits: Limits,
                  deadline: float | None = None) -> Request:
    """Checks every field of a GenerateRequest; InvalidRequest names the one at fault."""
    if msg.max_tokens < 0:
        raise InvalidRequest('max_tokens', f'must be >= 0, got {msg.max_tokens}')
    r = gen_request(msg, tokenizer)
    fields = {'constraint_field': msg.WhichOneof('constraint') or 'constraint',
              'budget_field': 'reasoning_budget'}
    compiler = None if r.constraint is None else constraint_compiler(
        tokenizer, limits.vocab_size, limits.eos_ids)
    check(r, limits, sampling_prefix='sampling.',
          tokens_field='token_ids' if msg.token_ids else 'prompt', compiler=compiler,
          **fields)
    return Request(r.prompt_ids, slot_settings(r, limits), tokenizer, tuple(r.stop),
                   r.logprobs or 0, deadline, matcher(r, tokenizer, limits))


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
        r.usage.cached_tokens = chunk.cached_tokens
    return r


def _filtered(req: Request, generated: int, found: str):
    """The last response of an answer classified unsafe: none of its unchecked tokens."""
    r = pb.GenerateResponse(finish_reason=pb.CONTENT_FILTER,
                            stop_reason=f'safety_model: {found}')
    r.usage.prompt_tokens = len(req.prompt)
    r.usage.completion_tokens = generated
    r.usage.cached_tokens = req.cached_tokens
    return r


def _refuse(e: Refusal, context) -> None:
    if e.code:
        context.set_trailing_metadata(((ERROR_CODE_KEY, e.code),))
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def _chunks(req: Request, context):
    """The request's chunks to the last; an engine failure, a cancellation or the deadline
    ends the call with its status, and a client gone raises _Gone (the request cancelled)."""
    # Client gone or deadline passed: free the slot, with the cause.
    context.add_callback(lambda: req.cancel(_cause(context)))
    while True:
        try:
            chunk = req.out.get(timeout=0.1)
        except queue.Empty:
            if not context.is_active():
                req.cancel(_cause(context))
                raise _Gone from None
            continue
        if chunk.finish_reason == 'error':
            context.abort(grpc.StatusCode.INTERNAL, chunk.stop_reason)
        if chunk.finish_reason == 'unavailable':
            context.abort(grpc.StatusCode.UNAVAILABLE, chunk.stop_reason)
        if chunk.finish_reason == 'cancelled':
            if chunk.stop_reason == 'deadline':
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              'the deadline passed before the request finished')
            if chunk.stop_reason == 'shutdown':
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              'the server shut down before the request finished')
            context.abort(grpc.StatusCode.CANCELLED, 'the client cancelled the request')
        yield chunk
        if chunk.finish_reason:
            return


class GlmServicer(pb_grpc.GlmServicer):
    def __init__(self, server: 'GlmServer'):
        self.s = server

    def Generate(self, request, context):
        self.s.check_ready(context)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            classifier = self.s.classifier(request.safety_model or None)
            req = build_request(request, self.s.tokenizer, self.s.limits, deadline)
            if classifier is not None:
                said = conversation('', [('user', request.text or self.s.tokenizer.decode(
                    req.prompt))])
                found = self._verdict(classifier, 'prompt', said, deadline, context)
                if found is not None:
                    raise classifier.unsafe_prompt(found)
            self._submit(req, context)
        except InvalidRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Refusal as e:
            _refuse(e, context)
        except _Gone:
            return
        with_logprobs = request.logprobs or request.top_logprobs > 0
        if classifier is None:
            try:
                for chunk in _chunks(req, context):
                    yield _response(chunk, with_logprobs)
            except _Gone:
                return
            return
        # Held back until classified: every stream_window tokens, and at the end.
        screen, generated = Screen(classifier.moderation.stream_window), 0
        try:
            for chunk in _chunks(req, context):
                generated += len(chunk.token_ids)
                final = chunk.finish_reason is not None
                due = screen.push(chunk, chunk.text, len(chunk.token_ids), final)
                if due is not None:
                    found = self._verdict(classifier, 'response', conversation(
                        said, [('assistant', due)]), deadline, context)
                    if found is not None:
                        req.cancel()
                        yield _filtered(req, generated, found)
                        return
                if due is not None or final:
                    for c in screen.passed():
                        yield _response(c, with_logprobs)
        except Refusal as e:
            req.cancel()
            _refuse(e, context)
        except _Gone:
            return

    def _submit(self, req: Request, context) -> None:
        try:
            self.s.orchestrator.submit(req)
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Draining as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    def _verdict(self, classifier: Classifier, stage: str, content: str,
                 deadline: float | None, context) -> str | None:
        """The category if `content` is unsafe at `stage`, else None: one more request
        through the same engine, under the caller's deadline."""
        r = classifier.request(stage, content)
        limits, tok = self.s.limits, self.s.tokenizer
        req = Request(r.prompt_ids, slot_settings(r, limits), tok, (), 0, deadline,
                      matcher(r, tok, limits))
        self._submit(req, context)
        return category(''.join(c.text for c in _chunks(req, context)).strip())

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
            served_names=self.s.served_names,
            **self.s.orchestrator.stats())


def authorized(header: str, expected: bytes) -> bool:
    """`Bearer <key>` (the scheme in any case), compared in constant time."""
    scheme, _, key = header.strip().partition(' ')
    got = f'Bearer {key.strip()}'.encode() if scheme.lower() == 'bearer' else b''
    return hmac.compare_digest(got, expected)


def _cause(context) -> str:
    remaining = context.time_remaining()
    return 'deadline' if remaining is not None and remaining <= 0 else 'client'


class BearerAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <key>` on every call but health checks."""

    def __init__(self, key: str):
        self.expected = f'Bearer {key}'.encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith('/grpc.health.v1.Health/'):
            return handler
        got = dict(details.invocation_metadata).get('authorization')
        if got is not None and authorized(got, self.expected):
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
                 api_key: str | None = None, tls: tuple[bytes, bytes] | None = None, *,
                 chat_template: ChatTemplate | None = None, served_names: tuple[str, ...] = (),
                 moderation: Moderation | None = None):
        """served_names: what `safety_model` (and HTTP's `model`) may say besides
        model_name; chat_template (default: GLM-4.6's) renders the moderation prompts of
        `moderation` (default: the moderation.json beside glmjax/serving/moderation.py)."""
        eos = cfg.eos_token_ids
        self.engine, self.tokenizer, self.cfg, self.model_name = engine, tokenizer, cfg, model_name
        self.served_names = tuple(dict.fromkeys((model_name,) + tuple(served_names)))
        self.chat_template = chat_template or ChatTemplate.default()
        self.moderation = moderation or Moderation.load()
        self.limits = Limits(cfg.vocab_size, engine.capacity, tuple(eos))
        self.orchestrator = Orchestrator(engine, max_queue)
        self.ready = self.stopping = False
        self.failure: str | None = None
        workers = engine.max_batch + max_queue + 8  # every waiting stream holds a thread
        self.grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='glmjax-grpc'),
            interceptors=[BearerAuth(api_key)] if api_key else [],
            # gRPC shares ports by default (SO_REUSEPORT): a second server on the same port
            # would silently take half the traffic. The port is ours alone.
            options=[('grpc.so_reuseport', 0)])
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

    def classifier(self, name: str | None) -> Classifier | None:
        """safety_model's checks for a request naming `name` (None: none asked)."""
        if name is None:
            return None
        limits = self.limits
        return Classifier.of(name, self.served_names, moderation=self.moderation,
                             chat_template=self.chat_template, encode=self.tokenizer.encode,
                             limits=limits, compiler=constraint_compiler(
                                 self.tokenizer, limits.vocab_size, limits.eos_ids))

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

    def warmup(self, progress=None) -> None:
        self.engine.warmup(progress)
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
