"""What the HTTP endpoints share: the `Backend` they talk to, its events, OpenAI-style
errors, and turning a request's sampling fields and output constraint into the one request
type of both APIs (glmjax/serving/contract.py)."""

import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, Protocol

import numpy as np
from fastapi.responses import JSONResponse, StreamingResponse

from glmjax.serving import contract
from glmjax.serving import openai_types as T
from glmjax.serving.chat import ChatTemplate
from glmjax.serving.constraints import ConstraintCompiler, ConstraintSpec, UnsupportedConstraint
from glmjax.serving.contract import GenRequest, InvalidRequest, Limits


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
    # Prompt tokens from the prefix cache: on the last event at least (the engine's are on
    # every one), the same on each.
    cached_tokens: int | None = None


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
        return cls(400, str(e), e.field, e.code)

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
    # Optional (read with getattr): the grammar compiler of the model's tokenizer (without
    # one, and without a `tokenizer` to build it from, constrained requests are refused).
    constraints: ConstraintCompiler | None

    def ready(self) -> bool: ...
    def draining(self) -> bool: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def generate_all(self, requests: list[GenRequest]) -> list[AsyncIterator[GenEvent]]:
        """Admits every request or none (ApiError 429/503), at once."""
    async def embed(self, prompts: list[list[int]]) -> np.ndarray: ...
    def stats(self) -> dict[str, float]: ...


MEDIA_PARTS = {'image_url': 'image', 'input_image': 'image', 'image': 'image',
               'input_audio': 'audio', 'audio_url': 'audio', 'video_url': 'video',
               'video': 'video', 'file': 'file'}


MAX_EMBEDDING_INPUTS = 256  # inputs per /v1/embeddings call (documents per /v1/rerank)


MAX_TOOLS = 128


MAX_TOOLS_CHARS = 256 << 10  # the tools list as JSON


def not_yet(field: str, what: str) -> ApiError:
    return ApiError(400, f'{field}: {what} is not supported by this server yet; the request '
                    'is refused rather than answered without it', field, 'unsupported_field')


def error_body(e: ApiError) -> dict:
    return {'error': {'message': e.message, 'type': e.kind, 'param': e.param, 'code': e.code}}


async def close_all(streams) -> None:
    for s in streams:
        if hasattr(s, 'aclose'):
            await s.aclose()


def limits(backend: Backend) -> Limits:
    return Limits(backend.vocab_size, backend.max_context, tuple(backend.eos_ids))


def no_surrogates(value, where: str) -> None:
    """Strings with lone surrogates cannot be encoded as UTF-8 (nor tokenized)."""
    if isinstance(value, str):
        try:
            value.encode('utf-8')
        except UnicodeEncodeError as e:
            raise ApiError(400, f'{where} is not valid Unicode: a lone surrogate at '
                           f'character {e.start}', where) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            no_surrogates(k, where)
            no_surrogates(v, f'{where}.{k}' if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            no_surrogates(v, f'{where}[{i}]')


# ---- output constraints: what a request may ask its answer to be --------------------------

class Constraint(NamedTuple):
    field: str  # the request field that asked for it, named in errors
    spec: ConstraintSpec


FORMAT_NAME = re.compile(r'[A-Za-z0-9_-]{1,64}')  # OpenAI's rule for json_schema.name


def make_spec(make: Callable[[], ConstraintSpec], field: str) -> ConstraintSpec:
    """A ConstraintSpec constructor's refusal (a malformed value) as a 400 naming `field`."""
    try:
        return make()
    except UnsupportedConstraint as e:
        raise ApiError(400, f'{field}: {e}', field) from None


def _schema_of(value, field: str) -> ConstraintSpec:
    """A JSON schema given as an object or as its JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ApiError(400, f'{field}: not valid JSON: {e}', field) from None
    if not isinstance(value, dict):
        raise ApiError(400, f'{field}: must be a JSON schema (an object, or its JSON text)',
                       field)
    return make_spec(lambda: ConstraintSpec.json_schema(value), field)


def response_format(fmt: T.ResponseFormat | None) -> ConstraintSpec | None:
    """OpenAI's and Together's response_format; None for text (or none)."""
    field = 'response_format'
    if fmt is None:
        return None
    nested = fmt.json_schema
    if fmt.type != 'json_schema' and nested is not None:
        raise ApiError(400, f'{field}.json_schema: only with type "json_schema"',
                       f'{field}.json_schema')
    if fmt.type == 'text':
        if fmt.schema_ is not None:
            raise ApiError(400, f'{field}.schema: type "text" takes no schema', f'{field}.schema')
        return None
    if fmt.type == 'json_object' and fmt.schema_ is None:
        return ConstraintSpec.json_object()
    # json_schema (OpenAI: json_schema.schema; Together: schema), or Together's older
    # {"type": "json_object", "schema": {...}}.
    if nested is not None and nested.name is not None and not FORMAT_NAME.fullmatch(nested.name):
        raise ApiError(400, f'{field}.json_schema.name: letters, digits, _ and - only, at most '
                       '64', f'{field}.json_schema.name')
    inner = None if nested is None else nested.schema_
    if inner is not None and fmt.schema_ is not None:
        raise ApiError(400, f'{field}: give the schema in json_schema.schema or in schema, not '
                       'both', field)
    if inner is None and fmt.schema_ is None:
        where = f'{field}.json_schema.schema' if nested is not None else f'{field}.json_schema'
        raise ApiError(400, f'{where}: a json_schema response format needs a schema', where)
    return _schema_of(fmt.schema_ if inner is None else inner, field)


def _vllm_spec(key: str, value, field: str) -> ConstraintSpec:
    if key == 'json':
        return _schema_of(value, field)
    if key == 'regex':
        return make_spec(lambda: ConstraintSpec.regex(value), field)
    if key == 'choice':
        return make_spec(lambda: ConstraintSpec.choice(value), field)
    return make_spec(lambda: ConstraintSpec.grammar(value), field)  # grammar


def structured_outputs(so: T.StructuredOutputs | None) -> ConstraintSpec | None:
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""
    field = 'structured_outputs'
    if so is None:
        return None
    for key, value in (so.model_extra or {}).items():
        if value is not None:  # whitespace, fallback and backend options: not ours to relax
            raise not_yet(f'{field}.{key}', f'the structured_outputs option {key!r}')
    given = {k: v for k, v in (('json', so.json_), ('regex', so.regex), ('choice', so.choice),
                               ('grammar', so.grammar)) if v is not None}
    if so.json_object:
        given['json_object'] = True
    if len(given) != 1:
        raise ApiError(400, f'{field}: set exactly one of json, regex, choice, grammar or '
                       f'json_object, got {", ".join(given) or "none"}', field)
    (key, value), = given.items()
    if key == 'json_object':
        return ConstraintSpec.json_object()
    return _vllm_spec(key, value, f'{field}.{key}')


def output_constraint(body: T.Sampling, tool_call: Constraint | None = None
                      ) -> Constraint | None:
    """The one output constraint of a request, from whichever field asked for it (chat
    passes a forced tool_choice); two are a 400."""
    asked = [] if tool_call is None else [tool_call]
    for field, spec in (('response_format', response_format(body.response_format)),
                        ('structured_outputs', structured_outputs(body.structured_outputs))):
        if spec is not None:
            asked.append(Constraint(field, spec))
    for key in ('json', 'regex', 'choice', 'grammar'):
        value = getattr(body, f'guided_{key}')
        if value is not None:
            asked.append(Constraint(f'guided_{key}', _vllm_spec(key, value, f'guided_{key}')))
    if len(asked) > 1:
        raise ApiError(400, f'{asked[1].field}: cannot be combined with {asked[0].field}: a '
                       'request takes one output constraint', asked[1].field)
    return asked[0] if asked else None


def compiler_of(backend: Backend) -> ConstraintCompiler | None:
    compiler = getattr(backend, 'constraints', None)
    tokenizer = getattr(backend, 'tokenizer', None)
    if compiler is None and tokenizer is not None:  # the serving backend: GlmServer's own
        compiler = contract.constraint_compiler(tokenizer, backend.vocab_size, backend.eos_ids)
    return compiler


LOGIT_BIAS_KEY = re.compile(r'-?[0-9]{1,12}')


def gen_requests(backend: Backend, body: T.Sampling, prompt: list[int], max_tokens,
                  logprobs: int | None, param: str, constraint: Constraint | None = None,
                  reasoning: bool = False, reasoning_budget: int | None = None
                  ) -> list[GenRequest]:
    """The request's `n` GenRequests, checked. `reasoning`: the prompt leaves the model
    about to reason (contract.starts_in_reasoning), so a constraint starts after it. A
    constraint is compiled here (the first one also builds the compiler, which reads the
    whole vocabulary): callers run this off the event loop."""
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
        logit_bias=bias, stop=stop, logprobs=logprobs, ignore_eos=body.ignore_eos,
        constraint=None if constraint is None else constraint.spec, reasoning=reasoning,
        reasoning_budget=reasoning_budget)
    fields = {'constraint_field': 'constraint' if constraint is None else constraint.field,
              'budget_field': 'reasoning.max_tokens'}
    compiler = None if constraint is None else compiler_of(backend)
    try:
        contract.check(base, limits(backend), compiler=compiler, **fields)
        if body.seed is not None:
            contract.check(dataclasses.replace(base, seed=body.seed + body.n - 1),
                           limits(backend), compiler=compiler, **fields)
    except InvalidRequest as e:
        raise ApiError.invalid(e) from None
    return [dataclasses.replace(base, seed=None if body.seed is None else body.seed + i)
            for i in range(body.n)]


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage; `cached`: prompt tokens served from the prefix cache."""
    return {'prompt_tokens': prompt, 'completion_tokens': completion,
            'total_tokens': prompt + completion,
            'prompt_tokens_details': {'cached_tokens': cached}}


def sse(chunks, handles) -> StreamingResponse:
    """Server-sent events; when the client leaves (Starlette then cancels this body) or the
    stream fails, every choice's engine request ends, not only the one being streamed."""
    async def body():
        try:
            async for c in chunks:
                yield f'data: {json.dumps(c, ensure_ascii=False)}\n\n'
        except ApiError as e:  # after the headers: the error travels as an event
            yield f'data: {json.dumps(error_body(e))}\n\n'
        finally:
            await close_all(handles)
        yield 'data: [DONE]\n\n'
    return StreamingResponse(body(), media_type='text/event-stream')


def prompts_of(backend: Backend, prompt, param: str) -> list[list[int]]:
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
