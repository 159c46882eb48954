"""Request bodies of the OpenAI/Together-compatible HTTP API, validated by pydantic.

Unknown fields are ignored (clients send many); wrong types are 400s that name the field.
The ranges of the sampling fields are checked by glmjax/serving/contract.py, the same for
gRPC and HTTP. Fields the server cannot honour yet are declared here so that using them is a
400 that says so, never silently ignored. Output constraints (response_format,
structured_outputs, the guided_* fields, a forced tool_choice) are typed loosely here and
checked by http_common.output_constraint, whose 400s name the exact field at fault.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra='ignore')


class StreamOptions(_Body):
    include_usage: bool = False


class Reasoning(_Body):
    enabled: bool = True
    # A reasoning budget: at most this many thinking tokens, then `</think>` is forced.
    max_tokens: int | None = Field(None, description='at most this many reasoning tokens, '
                                   'then the answer begins')


class JsonSchemaFormat(_Body):
    """OpenAI's `json_schema`: the answer is JSON that validates against `schema`."""
    name: str | None = Field(None, description='a-z, A-Z, 0-9, _ and -, at most 64')
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias='schema')
    # Always enforced exactly, whatever `strict` says (a schema feature that cannot be
    # enforced is a 400, never relaxed).
    strict: bool | None = None


class ResponseFormat(_Body):
    """{"type": "text"} (no constraint), {"type": "json_object"} (any JSON object),
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (OpenAI), or
    Together's {"type": "json_schema", "schema": {...}} (also with type json_object)."""
    type: Literal['text', 'json_object', 'json_schema']
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias='schema')  # Together's spelling


class StructuredOutputs(BaseModel):
    """vLLM's extension: exactly one of json (a JSON schema, or its JSON text), regex (the
    whole answer matches it), choice (the answer is one of the strings), grammar (Lark in
    llguidance's dialect, or GBNF), json_object (true: any JSON object). Other options are
    refused by name, not ignored."""
    model_config = ConfigDict(extra='allow')
    json_: dict[str, Any] | str | None = Field(None, alias='json')
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class Sampling(_Body):
    """Fields shared by chat and text completions."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)  # contract.MAX_N
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension, for benchmarks with fixed output lengths
    # Output constraints: at most one of these per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older spelling of structured_outputs' json, regex, choice and grammar.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Not honoured yet: a request that sets it is refused (400).
    safety_model: str | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra='allow')  # rendered into the prompt as given
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra='allow')
    type: Literal['function'] = 'function'
    function: FunctionDef


class ChatRequest(Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal['none', 'auto', 'required'] | dict[str, Any] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | int | None = None  # OpenAI: bool with top_logprobs; Together: int
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning: Reasoning | None = None
    # OpenAI's levels; GLM-4.6 reasons or not: 'none' turns thinking off, 'high' leaves it on,
    # the levels between are refused (http_chat._template_kwargs).
    reasoning_effort: str | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal['float', 'base64'] = 'float'


class RerankRequest(_Body):
    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str] | list[dict[str, Any]] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    rank_fields: list[str] | None = None


# ---- response bodies (what /openapi.json promises; the fuzz run checks them) -------------

class _Out(BaseModel):
    model_config = ConfigDict(extra='forbid')


class PromptTokensDetails(_Out):
    cached_tokens: int  # served from the prefix cache, not computed


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    error: ErrorDetail


class Health(_Out):
    status: Literal['ok']


class ModelCard(_Out):
    id: str
    object: Literal['model']
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(_Out):
    object: Literal['list']
    data: list[ModelCard]


class FunctionCall(_Out):
    name: str
    arguments: str  # JSON


class ToolCall(_Out):
    id: str
    type: Literal['function']
    index: int
    function: FunctionCall


class AssistantMessage(_Out):
    role: Literal['assistant']
    content: str | None
    reasoning: str | None
    reasoning_content: str | None  # the same text, under the name vLLM and SGLang use
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: Literal['stop', 'length', 'tool_calls', 'content_filter'] | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Out):
    id: str
    object: Literal['chat.completion']
    created: int
    model: str
    choices: list[ChatChoice]
    prompt: list[Any]  # Together's field: empty (the prompt is not echoed)
    usage: Usage


class TextChoice(_Out):
    index: int
    text: str
    finish_reason: Literal['stop', 'length', 'content_filter'] | None
    logprobs: dict[str, Any] | None


class TextCompletion(_Out):
    id: str
    object: Literal['text_completion']
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class Embedding(_Out):
    object: Literal['embedding']
    embedding: list[float] | str  # str: base64 of little-endian float32
    index: int


class EmbeddingList(_Out):
    object: Literal['list']
    data: list[Embedding]
    model: str
    usage: Usage


class RerankResult(_Out):
    index: int
    relevance_score: float
    document: dict[str, str]


class RerankResponse(_Out):
    id: str
    object: Literal['rerank']
    model: str
    results: list[RerankResult]
    usage: Usage
