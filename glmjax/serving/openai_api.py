"""The OpenAI/Together-compatible HTTP API (FastAPI), in front of the same engine as gRPC.

The app talks to a `Backend` (below): the serving engine adapted to async streams of token
events. Chat requests are rendered with the checkpoint's chat template, generated, and
parsed into reasoning, content and tool calls (serving/glm_parser.py); every error is an
OpenAI-style body `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from glmjax.serving import contract
from glmjax.serving import openai_types as T
from glmjax.serving.chat import ChatError, ChatTemplate
from glmjax.serving.contract import GenRequest, InvalidRequest, Limits
from glmjax.serving.glm_parser import GlmOutputParser
from glmjax.serving.metrics import Metrics
from glmjax.serving.service import authorized

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class GenEvent:
    token_ids: list[int]
    text: str  # decoded delta, stop strings already cut
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # 'stop' | 'length' on the last event
    queue_time: float | None = None  # seconds waited for a slot, on the first event


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = 'invalid_request_error',
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)
        self.retry_after = retry_after

    @classmethod
    def invalid(cls, e: InvalidRequest) -> 'ApiError':
        return cls(400, str(e), e.field)

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after is None else {'Retry-After': str(self.retry_after)}
        return JSONResponse(error_body(self), status_code=self.status, headers=headers)


class Backend(Protocol):
    """What the HTTP front needs of the engine (glmjax/serving/http_backend.py adapts it)."""
    model_name: str
    served_names: tuple[str, ...]  # what `model` may say (model_name among them)
    max_context: int
    vocab_size: int
    eos_ids: tuple[int, ...]
    chat_template: ChatTemplate

    def ready(self) -> bool: ...
    def draining(self) -> bool: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def generate_all(self, requests: list[GenRequest]) -> list[AsyncIterator[GenEvent]]:
        """Admits every request or none (ApiError 429/503), at once."""
    async def embed(self, prompts: list[list[int]]) -> np.ndarray: ...
    def stats(self) -> dict[str, float]: ...


UNSUPPORTED = {
    '/v1/images/generations': 'image generation', '/v1/audio/speech': 'speech synthesis',
    '/v1/audio/transcriptions': 'audio transcription', '/v2/videos': 'video generation',
}
MEDIA_PARTS = {'image_url': 'image', 'input_image': 'image', 'image': 'image',
               'input_audio': 'audio', 'audio_url': 'audio', 'video_url': 'video',
               'video': 'video', 'file': 'file'}


MAX_BODY_BYTES = 8 << 20  # request bodies beyond this are a 413
MAX_EMBEDDING_INPUTS = 256  # inputs per /v1/embeddings call (documents per /v1/rerank)
MAX_TOOLS = 128
MAX_TOOLS_CHARS = 256 << 10  # the tools list as JSON
RESERVED_TEMPLATE_ARGS = ('messages', 'tools', 'add_generation_prompt')


def error_body(e: ApiError) -> dict:
    return {'error': {'message': e.message, 'type': e.kind, 'param': e.param, 'code': e.code}}


def make_app(backend: Backend, api_key: str | None = None,
             max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title='glmjax', version='0.1.0',
                  description='OpenAI/Together-compatible API for GLM-4.x served by glmjax')
    metrics = Metrics(backend.stats)
    _install_errors(app, api_key, max_body_bytes)

    @app.get('/health')
    async def health():
        if backend.draining():
            raise ApiError(503, 'the server is draining: it finishes the requests in flight '
                           'and accepts no new ones', kind='unavailable', code='draining')
        if not backend.ready():
            raise ApiError(503, 'the model is loading or warming up', kind='unavailable',
                           code='loading')
        return {'status': 'ok'}

    @app.get('/metrics')
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get('/v1/models')
    async def models():
        return {'object': 'list', 'data': [{
            'id': name, 'object': 'model', 'created': 0, 'owned_by': 'glmjax',
            'root': backend.model_name, 'max_model_len': backend.max_context}
            for name in backend.served_names]}

    @app.post('/v1/chat/completions')
    async def chat(body: T.ChatRequest, request: Request):
        _check_model(backend, body.model)
        return await _until_disconnected(request, _chat(backend, metrics, body))

    @app.post('/v1/completions')
    async def completions(body: T.CompletionRequest, request: Request):
        _check_model(backend, body.model)
        return await _until_disconnected(request, _completions(backend, metrics, body))

    @app.post('/v1/embeddings')
    async def embeddings(body: T.EmbeddingRequest):
        _check_model(backend, body.model)
        return await _embeddings(backend, body)

    @app.post('/v1/rerank')
    async def rerank(body: T.RerankRequest):
        _check_model(backend, body.model)
        return await _rerank(backend, body)

    for path, what in UNSUPPORTED.items():
        app.add_api_route(path, _unsupported(what), methods=['POST'],
                          include_in_schema=False)
    return app


def _check_model(backend: Backend, model: str | None) -> None:
    if model is not None and model not in backend.served_names:
        raise ApiError(404, f'the model {model!r} does not exist: this server serves '
                       f'{", ".join(repr(n) for n in backend.served_names)}', 'model',
                       'model_not_found', kind='not_found_error')


async def _until_disconnected(request: Request, work):
    """Runs a handler's work, and cancels it (so its engine requests end at the next step)
    as soon as the client disconnects. A streaming response is returned at once: from then
    on Starlette watches the client and closes the stream."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return Response(status_code=499)  # nobody is there to read it


async def _close_all(streams) -> None:
    for s in streams:
        if hasattr(s, 'aclose'):
            await s.aclose()


def _limits(backend: Backend) -> Limits:
    return Limits(backend.vocab_size, backend.max_context, tuple(backend.eos_ids))


def _no_surrogates(value, where: str) -> None:
    """Strings with lone surrogates cannot be encoded as UTF-8 (nor tokenized)."""
    if isinstance(value, str):
        try:
            value.encode('utf-8')
        except UnicodeEncodeError as e:
            raise ApiError(400, f'{where} is not valid Unicode: a lone surrogate at '
                           f'character {e.start}', where) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_surrogates(k, where)
            _no_surrogates(v, f'{where}.{k}' if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_surrogates(v, f'{where}[{i}]')


def _unsupported(what: str):
    async def handler():
        raise ApiError(400, f'{what} is not supported: GLM-4.6 is a text-only model',
                       code='unsupported_modality')
    return handler


def _install_errors(app: FastAPI, api_key: str | None, max_body_bytes: int):
    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get('loc', ()) if x != 'body']
        param = '.'.join(loc) or None
        message = first.get('msg', 'invalid request')
        if first.get('type') == 'json_invalid':
            message, param = 'request body is not valid JSON', None
        return ApiError(400, f'{param or "body"}: {message}', param).response()

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = 'not_found' if e.status_code == 404 else 'invalid_request_error'
        return ApiError(e.status_code, str(e.detail), kind=kind).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        rid = uuid.uuid4().hex[:16]
        log.error('request %s (%s %s) failed', rid, request.method, request.url.path,
                  exc_info=e)
        return ApiError(500, f'internal error (request id {rid})', kind='server_error',
                        code='internal_error').response()

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)


class _Guard:
    """Pure ASGI (so that handlers can still see a client disconnect): every path but
    /health needs the key when one is set (the API, /metrics and the docs); a body is read
    here, at most `max_body_bytes` of it whatever Content-Length says, and replayed."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f'Bearer {api_key}'.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        headers = {k.decode('latin-1').lower(): v.decode('latin-1')
                   for k, v in scope.get('headers', [])}
        if self.expected is not None and scope['path'] != '/health':
            header = headers.get('authorization')
            if header is None or not authorized(header, self.expected):
                return await ApiError(401, 'missing or wrong API key (Authorization: Bearer '
                                      '...)', kind='authentication_error',
                                      code='invalid_api_key').response()(scope, receive, send)
        length = headers.get('content-length', '')
        if length.isascii() and length.isdigit() and int(length) > self.max_body_bytes:
            return await _too_large(self.max_body_bytes)(scope, receive, send)
        body, more = bytearray(), scope['method'] in ('POST', 'PUT', 'PATCH')
        while more:
            message = await receive()
            if message['type'] != 'http.request':
                return  # the client left before sending its body
            body += message.get('body', b'')
            more = message.get('more_body', False)
            if len(body) > self.max_body_bytes:
                return await _too_large(self.max_body_bytes)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {'type': 'http.request', 'body': bytes(body), 'more_body': False}
            return await receive()  # from here on: only the disconnect

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return ApiError(413, f'the request body exceeds the limit of {limit} bytes',
                    code='request_too_large').response()


# ---- chat ---------------------------------------------------------------------------------

ROLES = ('system', 'developer', 'user', 'assistant', 'tool')


def _check_messages(messages: list[dict]) -> list[dict]:
    """Checks each message; returns them with OpenAI's `developer` role read as `system`."""
    out = []
    for i, m in enumerate(messages):
        role = m.get('role')
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f'messages[{i}].role must be one of {", ".join(ROLES)}, got '
                           f'{role!r}', f'messages[{i}].role')
        content = m.get('content')
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get('type') if isinstance(part, dict) else None
                if isinstance(kind, str) and kind in MEDIA_PARTS:
                    raise ApiError(400, f'messages[{i}].content[{j}]: {MEDIA_PARTS[kind]} input '
                                   'is not supported: GLM-4.6 is a text-only model',
                                   f'messages[{i}].content[{j}]', 'unsupported_modality')
                if kind != 'text' or not isinstance(part.get('text'), str):
                    raise ApiError(400, f'messages[{i}].content[{j}] must be a text part '
                                   '({"type": "text", "text": "..."})',
                                   f'messages[{i}].content[{j}]')
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f'messages[{i}].content must be a string or a list of parts',
                           f'messages[{i}].content')
        if role in ('user', 'system', 'developer') and not content:
            raise ApiError(400, f'messages[{i}] ({role}) has no content',
                           f'messages[{i}].content')
        if role == 'tool' and not isinstance(m.get('tool_call_id'), str):
            raise ApiError(400, f'messages[{i}] (tool) needs a tool_call_id',
                           f'messages[{i}].tool_call_id')
        for key in ('reasoning', 'reasoning_content', 'name'):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ApiError(400, f'messages[{i}].{key} must be a string',
                               f'messages[{i}].{key}')
        _check_tool_calls(m.get('tool_calls'), f'messages[{i}].tool_calls')
        out.append({**m, 'role': 'system'} if role == 'developer' else m)
    return out


def _check_tool_calls(calls, where: str):
    if calls is None:
        return
    if not isinstance(calls, list):
        raise ApiError(400, f'{where} must be a list', where)
    for j, call in enumerate(calls):
        fn = call.get('function') if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get('name'), str):
            raise ApiError(400, f'{where}[{j}] must have a function with a name',
                           f'{where}[{j}]')
        if not isinstance(fn.get('arguments', '{}'), (str, dict)):
            raise ApiError(400, f'{where}[{j}].function.arguments must be a JSON string',
                           f'{where}[{j}]')


def _not_yet(field: str, what: str) -> ApiError:
    return ApiError(400, f'{field}: {what} is not supported by this server yet; the request '
                    'is refused rather than answered without it', field, 'unsupported_field')


def _check_unsupported(body: T.Sampling) -> None:
    """Fields the server cannot honour yet are errors, never silently ignored."""
    fmt = body.response_format
    if fmt is not None and fmt.get('type') != 'text':
        raise _not_yet('response_format', 'structured output (json_object, json_schema)')
    if body.safety_model is not None:
        raise _not_yet('safety_model', 'moderation by a safety model')
    for field in ('structured_outputs', 'guided_json', 'guided_regex', 'guided_choice',
                  'guided_grammar'):
        if getattr(body, field) is not None:
            raise _not_yet(field, 'constrained decoding')
    reasoning = getattr(body, 'reasoning', None)
    if reasoning is not None and reasoning.max_tokens is not None:
        raise _not_yet('reasoning.max_tokens', 'a reasoning budget')


def _tools_for(body: T.ChatRequest) -> list[dict] | None:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
    if tools and len(tools) > MAX_TOOLS:
        raise ApiError(400, f'at most {MAX_TOOLS} tools, got {len(tools)}', 'tools')
    if tools and len(json.dumps(tools, ensure_ascii=False)) > MAX_TOOLS_CHARS:
        raise ApiError(400, f'the tools take more than {MAX_TOOLS_CHARS} characters as JSON',
                       'tools')
    choice = body.tool_choice
    if choice == 'none':
        return None
    if isinstance(choice, dict):
        fn = choice.get('function')
        if choice.get('type', 'function') != 'function' or not isinstance(fn, dict) \
                or not isinstance(fn.get('name'), str):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or '
                           '{"type": "function", "function": {"name": ...}}', 'tool_choice')
        if not any((t.get('function') or {}).get('name') == fn['name'] for t in tools or []):
            raise ApiError(400, f'tool_choice names function {fn["name"]!r}, which is not in '
                           'tools', 'tool_choice')
        raise _not_yet('tool_choice', 'forcing a named function')
    if choice == 'required':
        if not tools:
            raise ApiError(400, 'tool_choice is required but no tools were given',
                           'tool_choice')
        raise _not_yet('tool_choice', '"required" (forcing a tool call)')
    return tools


def _template_kwargs(body: T.ChatRequest) -> dict:
    kwargs = dict(body.chat_template_kwargs or {})
    for name in RESERVED_TEMPLATE_ARGS:
        if name in kwargs:
            raise ApiError(400, f'chat_template_kwargs.{name} is set by the server and cannot '
                           'be passed', f'chat_template_kwargs.{name}')
    if body.reasoning is not None:
        kwargs['enable_thinking'] = body.reasoning.enabled
    return kwargs


LOGIT_BIAS_KEY = re.compile(r'-?[0-9]{1,12}')


def _gen_requests(backend: Backend, body: T.Sampling, prompt: list[int], max_tokens,
                  logprobs: int | None, param: str) -> list[GenRequest]:
    if len(prompt) >= backend.max_context:
        raise ApiError(400, f'the prompt is {len(prompt)} tokens; the context is '
                       f'{backend.max_context}', param, 'context_length_exceeded')
    room = backend.max_context - len(prompt)
    if isinstance(max_tokens, int) and max_tokens > room:
        raise ApiError(400, f'the prompt is {len(prompt)} tokens and max_tokens is '
                       f'{max_tokens}: more than the context of {backend.max_context}',
                       'max_tokens', 'context_length_exceeded')
    bias = {}
    for k, v in (body.logit_bias or {}).items():
        if not LOGIT_BIAS_KEY.fullmatch(k):
            raise ApiError(400, f'logit_bias key {k!r} is not a token id', 'logit_bias')
        bias[int(k)] = v
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    base = GenRequest(
        prompt_ids=prompt, max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias, stop=stop, logprobs=logprobs, ignore_eos=body.ignore_eos)
    try:
        contract.check(base, _limits(backend))
        if body.seed is not None:
            contract.check(dataclasses.replace(base, seed=body.seed + body.n - 1),
                           _limits(backend))
    except InvalidRequest as e:
        raise ApiError.invalid(e) from None
    return [dataclasses.replace(base, seed=None if body.seed is None else body.seed + i)
            for i in range(body.n)]


def _logprob_count(body: T.ChatRequest) -> tuple[int | None, str | None]:
    """(alternatives per token, response style) from OpenAI's bool or Together's int."""
    if body.logprobs is True:
        return body.top_logprobs or 0, 'openai'
    if isinstance(body.logprobs, int) and not isinstance(body.logprobs, bool) \
            and body.logprobs > 0:
        return body.logprobs, 'together'
    return None, None


def _render_and_encode(backend: Backend, messages, tools, kwargs) -> list[int]:
    try:
        text = backend.chat_template.render(messages, tools=tools, **kwargs)
    except ChatError as e:
        raise ApiError(400, str(e), 'messages') from None
    return backend.encode(text)


async def _chat(backend: Backend, metrics: Metrics, body: T.ChatRequest):
    _no_surrogates(body.model_dump(exclude_unset=True), '')
    _check_unsupported(body)
    messages = _check_messages(body.messages)
    tools = _tools_for(body)
    kwargs = _template_kwargs(body)
    # Rendering and tokenizing a long prompt takes a while: not on the event loop.
    prompt = await asyncio.to_thread(_render_and_encode, backend, messages, tools, kwargs)
    n_logprobs, style = _logprob_count(body)
    requests = _gen_requests(backend, body, prompt, body.max_completion_tokens or
                             body.max_tokens, n_logprobs, 'messages')
    rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())
    handles = backend.generate_all(requests)
    streams = [metrics.track(h, len(prompt)) for h in handles]
    if body.stream:
        return _sse(_chat_chunks(backend, body, streams, tools, rid, created, len(prompt)),
                    handles)
    try:
        choices = await asyncio.gather(*[_chat_choice(backend, i, s, tools, style)
                                         for i, s in enumerate(streams)])
    finally:  # an error in one choice, or the client gone: the others end too
        await _close_all(handles)
    completion = sum(c.pop('_tokens') for c in choices)
    return {'id': rid, 'object': 'chat.completion', 'created': created,
            'model': backend.model_name, 'choices': choices, 'prompt': [],
            'usage': _usage(len(prompt), completion)}


def _usage(prompt: int, completion: int) -> dict:
    return {'prompt_tokens': prompt, 'completion_tokens': completion,
            'total_tokens': prompt + completion}


async def _chat_choice(backend, index, stream, tools, style) -> dict:
    parser = GlmOutputParser(tools)
    n, finish, logprobs = 0, None, []
    async for event in stream:
        parser.feed(event.text)
        n += len(event.token_ids)
        logprobs += event.logprobs or []
        finish = event.finish_reason or finish
    parser.finish()
    parsed = parser.result()
    message = {'role': 'assistant', 'content': parsed.content or None,
               'reasoning': parsed.reasoning or None,
               'reasoning_content': parsed.reasoning or None}
    if parsed.tool_calls:
        message['tool_calls'] = [
            {'id': c.id, 'type': 'function', 'index': i,
             'function': {'name': c.name, 'arguments': c.arguments}}
            for i, c in enumerate(parsed.tool_calls)]
        if finish == 'stop':
            finish = 'tool_calls'
    choice = {'index': index, 'message': message, 'finish_reason': finish, '_tokens': n}
    if style:
        choice['logprobs'] = _format_logprobs(backend, logprobs, style)
    return choice


def _format_logprobs(backend, logprobs: list[TokenLogprob], style: str) -> dict:
    def entry(token_id, lp):
        text = backend.decode([token_id])
        return {'token': text, 'logprob': lp, 'bytes': list(text.encode())}
    if style == 'together':
        return {'token_ids': [t.token_id for t in logprobs],
                'tokens': [backend.decode([t.token_id]) for t in logprobs],
                'token_logprobs': [t.logprob for t in logprobs]}
    return {'content': [{**entry(t.token_id, t.logprob),
                         'top_logprobs': [entry(i, lp) for i, lp in t.top]}
                        for t in logprobs]}


async def _chat_chunks(backend, body, streams, tools, rid, created, n_prompt):
    def chunk(index, delta=None, finish=None, usage=None, logprobs=None):
        choices = [] if index is None else [{
            'index': index, 'delta': {'role': 'assistant', **(delta or {})},
            'finish_reason': finish, **({'logprobs': logprobs} if logprobs else {})}]
        out = {'id': rid, 'object': 'chat.completion.chunk', 'created': created,
               'model': backend.model_name, 'choices': choices}
        if usage:
            out['usage'] = usage
        return out

    total = 0
    for index, stream in enumerate(streams):
        parser = GlmOutputParser(tools)
        yield chunk(index, {'content': ''})
        finish, any_call = None, False
        async for event in stream:
            total += len(event.token_ids)
            finish = event.finish_reason or finish
            delta = parser.feed(event.text)
            if event.finish_reason:
                last = parser.finish()
                delta.reasoning += last.reasoning
                delta.content += last.content
                delta.tool_calls += last.tool_calls
            any_call |= bool(delta.tool_calls)
            payload = _chat_delta(delta)
            lp = (_format_logprobs(backend, event.logprobs, 'openai')
                  if event.logprobs else None)
            if payload or lp:
                yield chunk(index, payload, logprobs=lp)
        if any_call and finish == 'stop':
            finish = 'tool_calls'
        yield chunk(index, {}, finish)
    if body.stream_options and body.stream_options.include_usage:
        yield chunk(None, usage=_usage(n_prompt, total))


def _chat_delta(delta) -> dict:
    out = {}
    if delta.reasoning:
        out['reasoning'] = out['reasoning_content'] = delta.reasoning
    if delta.content:
        out['content'] = delta.content
    if delta.tool_calls:
        calls = []
        for c in delta.tool_calls:
            call = {'index': c.index, 'function': {'arguments': c.arguments}}
            if c.id is not None:
                call.update(id=c.id, type='function')
                call['function']['name'] = c.name
            calls.append(call)
        out['tool_calls'] = calls
    return out


def _sse(chunks, handles) -> StreamingResponse:
    """Server-sent events; when the client leaves (Starlette then cancels this body) or the
    stream fails, every choice's engine request ends, not only the one being streamed."""
    async def body():
        try:
            async for c in chunks:
                yield f'data: {json.dumps(c, ensure_ascii=False)}\n\n'
        except ApiError as e:  # after the headers: the error travels as an event
            yield f'data: {json.dumps(error_body(e))}\n\n'
        finally:
            await _close_all(handles)
        yield 'data: [DONE]\n\n'
    return StreamingResponse(body(), media_type='text/event-stream')


# ---- text completions ---------------------------------------------------------------------

def _prompts(backend: Backend, prompt, param: str) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, f'{param} is empty', param)
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        ids = backend.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, f'{param}[{i}] is empty', param)
        bad = [t for t in ids if not 0 <= t < backend.vocab_size]
        if bad:
            raise ApiError(400, f'{param}[{i}] has token id {bad[0]}, outside the vocabulary '
                           f'of {backend.vocab_size}', param)
        out.append(ids)
    return out


async def _completions(backend: Backend, metrics: Metrics, body: T.CompletionRequest):
    _no_surrogates(body.model_dump(exclude_unset=True), '')
    _check_unsupported(body)
    if body.suffix:
        raise ApiError(400, 'suffix is not supported: GLM-4.6 has no fill-in-the-middle mode',
                       'suffix')
    prompts = await asyncio.to_thread(_prompts, backend, body.prompt, 'prompt')
    if len(prompts) * body.n > contract.MAX_N:
        raise ApiError(400, f'{len(prompts)} prompts x n={body.n} is more than '
                       f'{contract.MAX_N} choices', 'prompt')
    rid, created = f'cmpl-{uuid.uuid4().hex}', int(time.time())
    requests, owners = [], []
    for p in prompts:
        for r in _gen_requests(backend, body, p, body.max_tokens, body.logprobs, 'prompt'):
            requests.append(r)
            owners.append(p)
    handles = backend.generate_all(requests)
    jobs = [(p, metrics.track(h, len(p))) for p, h in zip(owners, handles)]
    n_prompt = sum(len(p) for p in prompts) * body.n

    if body.stream:
        async def chunks():
            total = 0
            for index, (p, stream) in enumerate(jobs):
                if body.echo:
                    yield _text_chunk(rid, created, backend, index, backend.decode(p), None)
                async for e in stream:
                    total += len(e.token_ids)
                    yield _text_chunk(rid, created, backend, index, e.text, e.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield {'id': rid, 'object': 'text_completion', 'created': created,
                       'model': backend.model_name, 'choices': [],
                       'usage': _usage(n_prompt, total)}
        return _sse(chunks(), handles)

    async def collect(index, p, stream):
        text, n, finish, lps = '', 0, None, []
        async for e in stream:
            text += e.text
            n += len(e.token_ids)
            finish = e.finish_reason or finish
            lps += e.logprobs or []
        choice = {'index': index, 'text': (backend.decode(p) if body.echo else '') + text,
                  'finish_reason': finish, 'logprobs': None, '_tokens': n}
        if body.logprobs is not None:
            choice['logprobs'] = {
                'tokens': [backend.decode([t.token_id]) for t in lps],
                'token_logprobs': [t.logprob for t in lps],
                'top_logprobs': [{backend.decode([i]): lp for i, lp in t.top} for t in lps]}
        return choice

    try:
        choices = await asyncio.gather(*[collect(i, p, s) for i, (p, s) in enumerate(jobs)])
    finally:
        await _close_all(handles)
    completion = sum(c.pop('_tokens') for c in choices)
    return {'id': rid, 'object': 'text_completion', 'created': created,
            'model': backend.model_name, 'choices': choices,
            'usage': _usage(n_prompt, completion)}


def _text_chunk(rid, created, backend, index, text, finish):
    return {'id': rid, 'object': 'text_completion', 'created': created,
            'model': backend.model_name,
            'choices': [{'index': index, 'text': text, 'finish_reason': finish,
                         'logprobs': None}]}


# ---- embeddings and rerank ----------------------------------------------------------------

def _check_inputs(n: int, param: str) -> None:
    if n > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f'at most {MAX_EMBEDDING_INPUTS} inputs per call, got {n}', param)


async def _embeddings(backend: Backend, body: T.EmbeddingRequest):
    _no_surrogates(body.model_dump(exclude_unset=True), '')
    if isinstance(body.input, list) and body.input and not isinstance(body.input[0], int):
        _check_inputs(len(body.input), 'input')
    prompts = await asyncio.to_thread(_prompts, backend, body.input, 'input')
    for i, p in enumerate(prompts):
        if len(p) > backend.max_context:
            raise ApiError(400, f'input[{i}] is {len(p)} tokens; the context is '
                           f'{backend.max_context}', 'input', 'context_length_exceeded')
    vectors = await backend.embed(prompts)
    data = []
    for i, v in enumerate(np.asarray(vectors, np.float32)):
        emb: Any = (base64.b64encode(v.astype('<f4').tobytes()).decode()
                    if body.encoding_format == 'base64' else v.tolist())
        data.append({'object': 'embedding', 'embedding': emb, 'index': i})
    n = sum(len(p) for p in prompts)
    return {'object': 'list', 'data': data, 'model': backend.model_name,
            'usage': {'prompt_tokens': n, 'total_tokens': n}}


def _document_text(doc, fields: list[str] | None, i: int) -> str:
    if isinstance(doc, str):
        return doc
    fields = fields or ['text']
    missing = [f for f in fields if f not in doc]
    if missing:
        raise ApiError(400, f'documents[{i}] has no field {missing[0]!r} (rank_fields)',
                       'documents')
    return '\n'.join(f'{f}: {doc[f]}' if len(fields) > 1 else str(doc[f]) for f in fields)


async def _rerank(backend: Backend, body: T.RerankRequest):
    """Relevance = cosine similarity of the model's pooled embeddings of query and document."""
    _no_surrogates(body.model_dump(exclude_unset=True), '')
    _check_inputs(len(body.documents), 'documents')
    texts = [_document_text(d, body.rank_fields, i) for i, d in enumerate(body.documents)]
    prompts = await asyncio.to_thread(_prompts, backend, [body.query] + texts, 'documents')
    vectors = np.asarray(await backend.embed(prompts), np.float32)
    scores = vectors[1:] @ vectors[0]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[:body.top_n or len(texts)]
    results = [{'index': i, 'relevance_score': float(scores[i]),
                'document': {'text': texts[i]} if body.return_documents else {}}
               for i in order]
    n = sum(len(p) for p in prompts)
    return {'id': f'rerank-{uuid.uuid4().hex}', 'object': 'rerank',
            'model': backend.model_name, 'results': results,
            'usage': _usage(n, 0)}
