"""The OpenAI/Together-compatible HTTP API (FastAPI), in front of the same engine as gRPC.

The app talks to a `Backend` (below): the serving engine adapted to async streams of token
events. Chat requests are rendered with the checkpoint's chat template, generated, and
parsed into reasoning, content and tool calls (serving/glm_parser.py); every error is an
OpenAI-style body `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""

import asyncio
import base64
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from glmjax.serving import openai_types as T
from glmjax.serving.chat import ChatError, ChatTemplate
from glmjax.serving.glm_parser import GlmOutputParser
from glmjax.serving.metrics import Metrics


@dataclasses.dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token; None: no logprobs
    ignore_eos: bool = False


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
                 code: str | None = None, kind: str = 'invalid_request_error'):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)


class Backend(Protocol):
    """What the HTTP front needs of the engine (serving/http_backend.py adapts it)."""
    model_name: str
    max_context: int
    vocab_size: int
    chat_template: ChatTemplate

    def ready(self) -> bool: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def generate(self, request: GenRequest) -> AsyncIterator[GenEvent]: ...
    async def embed(self, prompts: list[list[int]]) -> np.ndarray: ...
    def stats(self) -> dict[str, float]: ...


UNSUPPORTED = {
    '/v1/images/generations': 'image generation', '/v1/audio/speech': 'speech synthesis',
    '/v1/audio/transcriptions': 'audio transcription', '/v2/videos': 'video generation',
}
MEDIA_PARTS = {'image_url': 'image', 'input_image': 'image', 'image': 'image',
               'input_audio': 'audio', 'audio_url': 'audio', 'video_url': 'video',
               'video': 'video', 'file': 'file'}


def error_body(e: ApiError) -> dict:
    return {'error': {'message': e.message, 'type': e.kind, 'param': e.param, 'code': e.code}}


def make_app(backend: Backend, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title='glmjax', version='0.1.0',
                  description='OpenAI/Together-compatible API for GLM-4.x served by glmjax')
    metrics = Metrics(backend.stats)
    _install_errors(app, api_key)

    @app.get('/health')
    async def health():
        if not backend.ready():
            raise ApiError(503, 'the model is loading or warming up', kind='unavailable')
        return {'status': 'ok'}

    @app.get('/metrics')
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get('/v1/models')
    async def models():
        return {'object': 'list', 'data': [{
            'id': backend.model_name, 'object': 'model', 'created': 0, 'owned_by': 'glmjax',
            'max_model_len': backend.max_context}]}

    @app.post('/v1/chat/completions')
    async def chat(body: T.ChatRequest):
        return await _chat(backend, metrics, body)

    @app.post('/v1/completions')
    async def completions(body: T.CompletionRequest):
        return await _completions(backend, metrics, body)

    @app.post('/v1/embeddings')
    async def embeddings(body: T.EmbeddingRequest):
        return await _embeddings(backend, body)

    @app.post('/v1/rerank')
    async def rerank(body: T.RerankRequest):
        return await _rerank(backend, body)

    for path, what in UNSUPPORTED.items():
        app.add_api_route(path, _unsupported(what), methods=['POST'],
                          include_in_schema=False)
    return app


def _unsupported(what: str):
    async def handler():
        raise ApiError(400, f'{what} is not supported: GLM-4.6 is a text-only model',
                       code='unsupported_modality')
    return handler


def _install_errors(app: FastAPI, api_key: str | None):
    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(error_body(e), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get('loc', ()) if x != 'body']
        param = '.'.join(loc) or None
        message = first.get('msg', 'invalid request')
        if first.get('type') == 'json_invalid':
            message, param = 'request body is not valid JSON', None
        return JSONResponse(error_body(ApiError(400, f'{param or "body"}: {message}', param)),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = 'not_found' if e.status_code == 404 else 'invalid_request_error'
        return JSONResponse(error_body(ApiError(e.status_code, str(e.detail), kind=kind)),
                            status_code=e.status_code)

    @app.middleware('http')
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith(('/v1', '/v2')):
            if request.headers.get('authorization') != f'Bearer {api_key}':
                e = ApiError(401, 'missing or wrong API key (Authorization: Bearer ...)',
                             kind='authentication_error', code='invalid_api_key')
                return JSONResponse(error_body(e), status_code=401)
        return await call_next(request)


# ---- chat ---------------------------------------------------------------------------------

def _check_messages(messages: list[dict]):
    roles = ('system', 'user', 'assistant', 'tool')
    for i, m in enumerate(messages):
        role = m.get('role')
        if role not in roles:
            raise ApiError(400, f'messages[{i}].role must be one of {", ".join(roles)}, got '
                           f'{role!r}', f'messages[{i}].role')
        content = m.get('content')
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get('type') if isinstance(part, dict) else None
                if kind in MEDIA_PARTS:
                    raise ApiError(400, f'messages[{i}].content[{j}]: {MEDIA_PARTS[kind]} input '
                                   'is not supported: GLM-4.6 is a text-only model',
                                   f'messages[{i}].content[{j}]', 'unsupported_modality')
                if kind != 'text' or not isinstance(part.get('text'), str):
                    raise ApiError(400, f'messages[{i}].content[{j}] must be a text part',
                                   f'messages[{i}].content[{j}]')
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f'messages[{i}].content must be a string or a list of parts',
                           f'messages[{i}].content')
        if role in ('user', 'system') and not content:
            raise ApiError(400, f'messages[{i}] ({role}) has no content',
                           f'messages[{i}].content')
        if role == 'tool' and not isinstance(m.get('tool_call_id'), str):
            raise ApiError(400, f'messages[{i}] (tool) needs a tool_call_id',
                           f'messages[{i}].tool_call_id')
        for key in ('reasoning', 'reasoning_content'):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ApiError(400, f'messages[{i}].{key} must be a string',
                               f'messages[{i}].{key}')
        _check_tool_calls(m.get('tool_calls'), f'messages[{i}].tool_calls')


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


def _tools_for(body: T.ChatRequest) -> list[dict] | None:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
    choice = body.tool_choice
    if choice == 'none':
        return None
    if isinstance(choice, dict):
        name = (choice.get('function') or {}).get('name')
        chosen = [t for t in tools or [] if (t.get('function') or {}).get('name') == name]
        if not chosen:
            raise ApiError(400, f'tool_choice names function {name!r}, which is not in tools',
                           'tool_choice')
        return chosen
    if choice == 'required' and not tools:
        raise ApiError(400, 'tool_choice is required but no tools were given', 'tool_choice')
    return tools


def _template_kwargs(body: T.ChatRequest) -> dict:
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning is not None:
        kwargs['enable_thinking'] = body.reasoning.enabled
    return kwargs


def _gen_requests(backend: Backend, body: T.Sampling, prompt: list[int], max_tokens,
                  logprobs: int | None, param: str) -> list[GenRequest]:
    if len(prompt) >= backend.max_context:
        raise ApiError(400, f'the prompt is {len(prompt)} tokens; the context is '
                       f'{backend.max_context}', param, 'context_length_exceeded')
    room = backend.max_context - len(prompt)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f'the prompt is {len(prompt)} tokens and max_tokens is '
                       f'{max_tokens}: more than the context of {backend.max_context}',
                       'max_tokens', 'context_length_exceeded')
    bias = {}
    for k, v in (body.logit_bias or {}).items():
        if not k.lstrip('-').isdigit() or not 0 <= int(k) < backend.vocab_size:
            raise ApiError(400, f'logit_bias key {k!r} is not a token id below '
                           f'{backend.vocab_size}', 'logit_bias')
        bias[int(k)] = max(-100.0, min(100.0, v))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    base = GenRequest(
        prompt_ids=prompt, max_tokens=max_tokens or room,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p or 1.0, top_k=max(0, body.top_k or 0), min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias, stop=[s for s in stop if s], logprobs=logprobs,
        ignore_eos=body.ignore_eos)
    return [dataclasses.replace(base, seed=None if body.seed is None else body.seed + i)
            for i in range(body.n)]


def _logprob_count(body: T.ChatRequest) -> tuple[int | None, str | None]:
    """(alternatives per token, response style) from OpenAI's bool or Together's int."""
    if body.logprobs is True:
        return body.top_logprobs or 0, 'openai'
    if isinstance(body.logprobs, int) and not isinstance(body.logprobs, bool) \
            and body.logprobs > 0:
        return min(body.logprobs, 20), 'together'
    return None, None


async def _chat(backend: Backend, metrics: Metrics, body: T.ChatRequest):
    _check_messages(body.messages)
    tools = _tools_for(body)
    try:
        text = backend.chat_template.render(body.messages, tools=tools,
                                            **_template_kwargs(body))
    except ChatError as e:
        raise ApiError(400, str(e), 'messages') from None
    prompt = backend.encode(text)
    n_logprobs, style = _logprob_count(body)
    requests = _gen_requests(backend, body, prompt, body.max_completion_tokens or
                             body.max_tokens, n_logprobs, 'messages')
    rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())
    streams = [metrics.track(backend.generate(r), len(prompt)) for r in requests]
    if body.stream:
        return _sse(_chat_chunks(backend, body, streams, tools, rid, created, len(prompt)))
    choices = await asyncio.gather(*[_chat_choice(backend, i, s, tools, style)
                                     for i, s in enumerate(streams)])
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


def _sse(chunks) -> StreamingResponse:
    async def body():
        try:
            async for c in chunks:
                yield f'data: {json.dumps(c, ensure_ascii=False)}\n\n'
        except ApiError as e:  # after the headers: the error travels as an event
            yield f'data: {json.dumps(error_body(e))}\n\n'
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
    if body.suffix:
        raise ApiError(400, 'suffix is not supported: GLM-4.6 has no fill-in-the-middle mode',
                       'suffix')
    prompts = _prompts(backend, body.prompt, 'prompt')
    rid, created = f'cmpl-{uuid.uuid4().hex}', int(time.time())
    jobs = []
    for p in prompts:
        for r in _gen_requests(backend, body, p, body.max_tokens, body.logprobs, 'prompt'):
            jobs.append((p, metrics.track(backend.generate(r), len(p))))
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
        return _sse(chunks())

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

    choices = await asyncio.gather(*[collect(i, p, s) for i, (p, s) in enumerate(jobs)])
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

async def _embeddings(backend: Backend, body: T.EmbeddingRequest):
    prompts = _prompts(backend, body.input, 'input')
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
    texts = [_document_text(d, body.rank_fields, i) for i, d in enumerate(body.documents)]
    prompts = _prompts(backend, [body.query] + texts, 'documents')
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
