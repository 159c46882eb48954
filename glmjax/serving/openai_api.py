"""The OpenAI/Together-compatible HTTP API (FastAPI), in front of the same engine as gRPC.

The app talks to a `Backend` (glmjax/serving/http_common.py): the serving engine adapted to
async streams of token events. One module per endpoint: http_chat.py, http_completions.py,
http_embeddings.py; request and response bodies are typed in openai_types.py, so
/openapi.json describes both. Every error is an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` with a 4xx (or 5xx) status.
"""

import asyncio
import contextlib
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from glmjax.serving import http_chat, http_completions, http_embeddings
from glmjax.serving import openai_types as T
from glmjax.serving.http_common import ApiError, Backend, GenEvent, TokenLogprob
from glmjax.serving.metrics import Metrics
from glmjax.serving.service import authorized

log = logging.getLogger(__name__)

__all__ = ['ApiError', 'Backend', 'GenEvent', 'TokenLogprob', 'make_app']


UNSUPPORTED = {
    '/v1/images/generations': 'image generation', '/v1/audio/speech': 'speech synthesis',
    '/v1/audio/transcriptions': 'audio transcription', '/v2/videos': 'video generation',
}


MAX_BODY_BYTES = 8 << 20  # request bodies beyond this are a 413


def make_app(backend: Backend, api_key: str | None = None,
             max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title='glmjax', version='0.1.0',
                  description='OpenAI/Together-compatible API for GLM-4.x served by glmjax')
    metrics = Metrics(backend.stats)
    _install_errors(app, api_key, max_body_bytes)

    errors = {status: {'model': T.ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
    streams = {'content': {'text/event-stream': {}},
               'description': 'JSON, or server-sent events when `stream` is true'}

    @app.get('/health', response_model=T.Health, responses={503: {'model': T.ErrorResponse}})
    async def health():
        if backend.draining():
            raise ApiError(503, 'the server is draining: it finishes the requests in flight '
                           'and accepts no new ones', kind='unavailable', code='draining')
        if not backend.ready():
            raise ApiError(503, 'the model is loading or warming up', kind='unavailable',
                           code='loading')
        return {'status': 'ok'}

    @app.get('/metrics', response_class=Response,
             responses={200: {'content': {'text/plain': {}}}})
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get('/v1/models', response_model=T.ModelList)
    async def models():
        return {'object': 'list', 'data': [{
            'id': name, 'object': 'model', 'created': 0, 'owned_by': 'glmjax',
            'root': backend.model_name, 'max_model_len': backend.max_context}
            for name in backend.served_names]}

    @app.post('/v1/chat/completions', response_model=T.ChatCompletion,
              responses={**errors, 200: streams})
    async def chat(body: T.ChatRequest, request: Request):
        _check_model(backend, body.model)
        return await _until_disconnected(request, http_chat.chat(backend, metrics, body))

    @app.post('/v1/completions', response_model=T.TextCompletion,
              responses={**errors, 200: streams})
    async def completions(body: T.CompletionRequest, request: Request):
        _check_model(backend, body.model)
        return await _until_disconnected(
            request, http_completions.completions(backend, metrics, body))

    @app.post('/v1/embeddings', response_model=T.EmbeddingList, responses=errors)
    async def embeddings(body: T.EmbeddingRequest, request: Request):
        _check_model(backend, body.model)
        return await _until_disconnected(request, http_embeddings.embeddings(backend, body))

    @app.post('/v1/rerank', response_model=T.RerankResponse, responses=errors)
    async def rerank(body: T.RerankRequest, request: Request):
        _check_model(backend, body.model)
        return await _until_disconnected(request, http_embeddings.rerank(backend, body))

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
