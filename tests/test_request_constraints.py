"""Output constraints and reasoning budgets at the API edges: what a request may ask for over
HTTP (response_format, structured_outputs, guided_*, a forced tool_choice, reasoning.max_tokens)
and gRPC (the GenerateRequest `constraint` oneof, reasoning_budget), parsed into the one
GenRequest, compiled at validation (an unsupported schema feature is a 400 naming it, with the same
message on both APIs), and handed to the engine."""

import types

import grpc
import httpx
import openai
import pydantic
import pytest
from fake_backend import FakeBackend, serve

from glmjax.config import GlmConfig
from glmjax.serving import contract, http_common
from glmjax.serving import openai_types as T
from glmjax.serving.constraints import ConstraintCompiler, ConstraintSpec
from glmjax.serving.contract import InvalidRequest, Limits
from glmjax.serving.http_common import ApiError
from glmjax.serving.openai_api import make_app
from glmjax.serving.orchestrator import Chunk
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.server import DEMO_MODEL
from glmjax.serving.service import GlmServer, build_request, gen_request
from glmjax.serving.tokenizer import Tokenizer

USER = [{'role': 'user', 'content': 'Weather in Paris?'}]
TOOLS = [{'type': 'function', 'function': {'name': 'get_weather', 'parameters': {
    'type': 'object', 'required': ['city'], 'properties': {'city': {'type': 'string'}}}}},
    {'type': 'function', 'function': {'name': 'get_time', 'parameters': {
        'type': 'object', 'properties': {}}}}]
SCHEMA = {'type': 'object', 'properties': {'a': {'type': 'integer'}}, 'required': ['a']}
CHAT, TEXT = '/v1/chat/completions', '/v1/completions'


@pytest.fixture(scope='module')
def tokenizer():
    return Tokenizer.from_dir(DEMO_MODEL)


class ConstrainedBackend(FakeBackend):
    """The fake backend with a real grammar compiler (the demo model's tokenizer, whose
    vocabulary has FakeBackend's size): requests are compiled as the server compiles them."""

    def __init__(self, tokenizer):
        super().__init__()
        self.constraints = ConstraintCompiler(tokenizer, self.vocab_size, self.eos_ids)


@pytest.fixture(scope='module')
def server(tokenizer):
    backend = ConstrainedBackend(tokenizer)
    with serve(make_app(backend)) as url:
        yield backend, url


@pytest.fixture
def backend(server):
    server[0].requests = []
    return server[0]


def post(server, path, body):
    return httpx.post(server[1] + path, json=body, timeout=30)


def error(r, status=400) -> dict:
    assert r.status_code == status, r.text
    return r.json()['error']


# ---- HTTP: parsing the fields into a ConstraintSpec --------------------------------------

def fmt(value) -> ConstraintSpec | None:
    return http_common.response_format(T.ResponseFormat.model_validate(value))


def test_response_format_spellings():
    assert fmt({'type': 'text'}) is None
    assert fmt({'type': 'json_object'}) == ConstraintSpec.json_object()
    expected = ConstraintSpec.json_schema(SCHEMA)
    assert fmt({'type': 'json_schema', 'json_schema': {  # OpenAI
        'name': 'answer', 'schema': SCHEMA, 'strict': True}}) == expected
    assert fmt({'type': 'json_schema', 'schema': SCHEMA}) == expected  # Together
    assert fmt({'type': 'json_object', 'schema': SCHEMA}) == expected  # Together, older


@pytest.mark.parametrize('value, param', [
    ({'type': 'json_schema'}, 'response_format.json_schema'),
    ({'type': 'json_schema', 'json_schema': {'name': 'x'}}, 'response_format.json_schema.schema'),
    ({'type': 'json_schema', 'json_schema': {'name': 'a b', 'schema': SCHEMA}},
     'response_format.json_schema.name'),
    ({'type': 'json_schema', 'json_schema': {'schema': SCHEMA}, 'schema': SCHEMA},
     'response_format'),
    ({'type': 'text', 'schema': SCHEMA}, 'response_format.schema'),
    ({'type': 'json_object', 'json_schema': {'schema': SCHEMA}}, 'response_format.json_schema'),
])
def test_malformed_response_format_names_the_field(value, param):
    with pytest.raises(ApiError) as e:
        fmt(value)
    assert e.value.status == 400 and e.value.param == param


def so(value) -> ConstraintSpec | None:
    return http_common.structured_outputs(T.StructuredOutputs.model_validate(value))


def test_structured_outputs_each_kind():
    assert so({'json': SCHEMA}) == ConstraintSpec.json_schema(SCHEMA)
    assert so({'json': '{"type": "object", "properties": {"a": {"type": "integer"}}, '
                       '"required": ["a"]}'}) == ConstraintSpec.json_schema(SCHEMA)
    assert so({'regex': '[0-9]+'}) == ConstraintSpec.regex('[0-9]+')
    assert so({'choice': ['yes', 'no']}) == ConstraintSpec.choice(['yes', 'no'])
    assert so({'grammar': 'start: "a"+'}) == ConstraintSpec.grammar('start: "a"+')
    assert so({'json_object': True}) == ConstraintSpec.json_object()


@pytest.mark.parametrize('value, param, code', [
    ({}, 'structured_outputs', None),
    ({'regex': 'a', 'choice': ['a']}, 'structured_outputs', None),
    ({'json': '{"type": '}, 'structured_outputs.json', None),
    ({'json': '[1]'}, 'structured_outputs.json', None),
    ({'choice': []}, 'structured_outputs.choice', None),
    ({'regex': 'a', 'whitespace_pattern': ' *'}, 'structured_outputs.whitespace_pattern',
     'unsupported_field'),
])
def test_malformed_structured_outputs_name_the_field(value, param, code):
    with pytest.raises(ApiError) as e:
        so(value)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)


def test_one_constraint_per_request():
    body = T.ChatRequest.model_validate({'messages': USER, 'guided_regex': 'a+'})
    assert http_common.output_constraint(body) == ('guided_regex', ConstraintSpec.regex('a+'))
    body = T.ChatRequest.model_validate({'messages': USER, 'response_format': {
        'type': 'json_object'}, 'structured_outputs': {'regex': 'a'}})
    with pytest.raises(ApiError) as e:
        http_common.output_constraint(body)
    assert e.value.param == 'structured_outputs' and 'response_format' in e.value.message


def test_starts_in_reasoning():
    assert contract.starts_in_reasoning('<|user|>\nhi<|assistant|>')  # thinking on
    assert contract.starts_in_reasoning('<|user|>\nhi<|assistant|>\n<think>Hm, ')
    assert not contract.starts_in_reasoning('<|user|>\nhi<|assistant|>\n<think></think>')
    assert not contract.starts_in_reasoning('def fibonacci(n):')  # no chat turn
    assert not contract.starts_in_reasoning('<|assistant|>\n<think>a</think>\nb<|user|>\nc')


# ---- HTTP: end to end over the app ------------------------------------------------------

@pytest.mark.parametrize('extra, spec', [
    ({'response_format': {'type': 'json_schema', 'json_schema': {'name': 'x',
                                                                 'schema': SCHEMA}}},
     ConstraintSpec.json_schema(SCHEMA)),
    ({'response_format': {'type': 'json_object'}}, ConstraintSpec.json_object()),
    ({'structured_outputs': {'regex': '[a-z]+'}}, ConstraintSpec.regex('[a-z]+')),
    ({'tools': TOOLS, 'tool_choice': 'required'}, ConstraintSpec.tool_call(TOOLS)),
    ({'tools': TOOLS, 'tool_choice': {'type': 'function', 'function': {'name': 'get_time'}}},
     ConstraintSpec.tool_call(TOOLS, 'get_time')),
])
def test_chat_request_reaches_the_backend_with_its_constraint(backend, server, extra,
                                                              spec):
    r = post(server, CHAT, {'messages': USER, 'n': 2, **extra})
    assert r.status_code == 200, r.text
    assert [q.constraint for q in backend.requests] == [spec, spec]
    assert backend.requests[0].reasoning  # GLM thinking is on by default


class Answer(pydantic.BaseModel):
    city: str
    days: list[int]


def test_openai_sdk_parse_sends_a_schema_the_server_compiles(backend, server):
    client = openai.OpenAI(base_url=server[1] + '/v1', api_key='none', max_retries=0)
    # Thinking is on: the engine ends the reasoning with </think> before the answer.
    backend.script = '</think>{"city": "Paris", "days": [1, 2]}'
    try:
        r = client.chat.completions.parse(model='m', messages=USER, response_format=Answer)
    finally:
        backend.script = 'Hello.'
    assert r.choices[0].message.parsed == Answer(city='Paris', days=[1, 2])
    spec = backend.requests[0].constraint
    assert spec.kind == 'json_schema' and '"additionalProperties":false' in spec.text


def test_thinking_and_the_budget(backend, server):
    schema = {'response_format': {'type': 'json_object'}}
    assert post(server, CHAT, {'messages': USER, 'reasoning': {'max_tokens': 64},
                               **schema}).status_code == 200
    assert (backend.requests[0].reasoning, backend.requests[0].reasoning_budget) == (True, 64)
    # Thinking off: the template closes the think block, the constraint starts at once.
    for off in ({'reasoning': {'enabled': False}},
                {'chat_template_kwargs': {'enable_thinking': False}}):
        assert post(server, CHAT, {'messages': USER, **off, **schema}).status_code == 200
        assert backend.requests[-1].reasoning is False
    # A budget alone (no constraint) reaches the engine too.
    assert post(server, CHAT, {'messages': USER, 'reasoning': {'max_tokens': 0}}
                ).status_code == 200
    assert (backend.requests[-1].constraint, backend.requests[-1].reasoning_budget) == (None, 0)


def test_completions_carry_the_constraint(backend, server):
    r = post(server, TEXT, {'prompt': ['Answer: ', '<|user|>\nhi<|assistant|>'],
                            'structured_outputs': {'choice': ['yes', 'no']}})
    assert r.status_code == 200, r.text
    assert [q.constraint for q in backend.requests] == [ConstraintSpec.choice(['yes', 'no'])] * 2
    assert [q.reasoning for q in backend.requests] == [False, True]


@pytest.mark.parametrize('extra, feature', [
    ({'response_format': {'type': 'json_schema', 'schema': {'not': {'type': 'string'}}}},
     'not'),
    ({'structured_outputs': {'json': {'type': 'string', 'format': 'uri-reference'}}},
     'uri-reference'),
    ({'guided_json': {'type': 'array', 'uniqueItems': True}}, 'uniqueItems'),
    ({'tools': [{'type': 'function', 'function': {'name': 'f', 'parameters': {
        'type': 'object', 'properties': {'d': {'type': 'string', 'format': 'date'}}}}}],
      'tool_choice': 'required'}, 'format'),
])
def test_unsupported_schema_feature_is_a_400_naming_it(backend, server, extra, feature):
    """Compiled at validation, before the request is queued (and before the engine gate)."""
    err = error(post(server, CHAT, {'messages': USER, **extra}))
    assert err['code'] == 'unsupported_constraint' and feature in err['message']
    assert err['param'] == next(iter(k for k in extra if k != 'tools'))
    assert backend.requests == []


@pytest.mark.parametrize('body, param', [
    ({'structured_outputs': {'regex': 'a('}}, 'structured_outputs'),
    ({'guided_grammar': 'start: ('}, 'guided_grammar'),
    ({'reasoning': {'max_tokens': -1}}, 'reasoning.max_tokens'),
    ({'reasoning': {'max_tokens': 'many'}}, 'reasoning.max_tokens'),
    ({'response_format': {'type': 'xml'}}, 'response_format.type'),
    ({'response_format': {'type': 'json_object'}, 'ignore_eos': True}, 'ignore_eos'),
    ({'tools': TOOLS, 'tool_choice': {'type': 'function', 'function': {'name': 'nope'}}},
     'tool_choice'),
    ({'tools': [{'type': 'function', 'function': {'name': 'get weather'}}],
      'tool_choice': 'required'}, 'tools[0].name'),
    ({'tools': TOOLS, 'tool_choice': 'required', 'response_format': {'type': 'json_object'}},
     'response_format'),
])
def test_malformed_values_are_400s_naming_the_field(backend, server, body, param):
    err = error(post(server, CHAT, {'messages': USER, **body}))
    assert err['param'] == param, err
    assert backend.requests == []


def test_serving_backend_shares_the_grpc_compiler(tokenizer):
    """EngineBackend carries the server's tokenizer: its compiler (and cache) is gRPC's."""
    like_engine_backend = types.SimpleNamespace(tokenizer=tokenizer, vocab_size=4160,
                                                eos_ids=(0, 7, 9))
    compiler = http_common.compiler_of(like_engine_backend)
    assert compiler is contract.constraint_compiler(tokenizer, 4160, [0, 7, 9])
    assert http_common.compiler_of(FakeBackend()) is None


# ---- gRPC --------------------------------------------------------------------------------

LIMITS = Limits(4160, 128, (0, 7, 9))
GRPC_TOOLS = [pb.ToolSchema(name='get_weather', parameters='{"type": "object", "required": '
                            '["city"], "properties": {"city": {"type": "string"}}}'),
              pb.ToolSchema(name='get_time')]


@pytest.mark.parametrize('fields, spec', [
    ({'json_schema': '{"type": "object", "properties": {"a": {"type": "integer"}}, '
                     '"required": ["a"]}'}, ConstraintSpec.json_schema(SCHEMA)),
    ({'json_object': True}, ConstraintSpec.json_object()),
    ({'regex': '[0-9]+'}, ConstraintSpec.regex('[0-9]+')),
    ({'choice': pb.ChoiceList(choices=['yes', 'no'])}, ConstraintSpec.choice(['yes', 'no'])),
    ({'grammar': 'start: "a"'}, ConstraintSpec.grammar('start: "a"')),
    ({'tool_call': pb.ToolCallConstraint(tools=GRPC_TOOLS)},
     ConstraintSpec.tool_call([{'name': 'get_weather', 'parameters': TOOLS[0]['function'][
         'parameters']}, {'name': 'get_time'}])),
    ({'tool_call': pb.ToolCallConstraint(tools=GRPC_TOOLS, name='get_time')},
     ConstraintSpec.tool_call([{'name': 'get_weather', 'parameters': TOOLS[0]['function'][
         'parameters']}, {'name': 'get_time'}], 'get_time')),
])
def test_grpc_constraint_fields(tokenizer, fields, spec):
    r = gen_request(pb.GenerateRequest(text='Answer: ', **fields), tokenizer)
    assert (r.constraint, r.reasoning, r.reasoning_budget) == (spec, False, None)


def test_grpc_reasoning_from_the_prompt(tokenizer):
    ids = tokenizer.encode('<|user|>\nhi<|assistant|>')
    r = gen_request(pb.GenerateRequest(token_ids=ids, regex='a', reasoning_budget=5), tokenizer)
    assert (r.reasoning, r.reasoning_budget) == (True, 5)
    r = gen_request(pb.GenerateRequest(text='<|user|>\nhi<|assistant|>\n<think></think>',
                                       regex='a'), tokenizer)
    assert not r.reasoning


@pytest.mark.parametrize('fields, field, code', [
    ({'json_object': False}, 'json_object', None),
    ({'json_schema': '{"type": '}, 'json_schema', None),
    ({'json_schema': '[]'}, 'json_schema', None),
    ({'choice': pb.ChoiceList()}, 'choice', None),
    ({'regex': 'a('}, 'regex', 'unsupported_constraint'),
    ({'json_schema': '{"not": {}}'}, 'json_schema', 'unsupported_constraint'),
    ({'tool_call': pb.ToolCallConstraint()}, 'tool_call.tools', None),
    ({'tool_call': pb.ToolCallConstraint(tools=GRPC_TOOLS, name='nope')}, 'tool_call.name',
     None),
    ({'tool_call': pb.ToolCallConstraint(tools=[pb.ToolSchema(name='f', parameters='{')])},
     'tool_call.tools[0].parameters', None),
    ({'tool_call': pb.ToolCallConstraint(tools=[pb.ToolSchema(name='a b')])},
     'tool_call.tools[0].name', None),
    ({'regex': 'a', 'ignore_eos': True}, 'ignore_eos', None),
    ({'reasoning_budget': -1}, 'reasoning_budget', None),
    ({'token_ids': [-5], 'text': '', 'regex': 'a'}, 'token_ids[0]', None),
])
def test_grpc_invalid_constraints_name_the_field(tokenizer, fields, field, code):
    with pytest.raises(InvalidRequest) as e:
        build_request(pb.GenerateRequest(**{'text': '<|assistant|>', **fields}), tokenizer,
                      LIMITS)
    assert (e.value.field, e.value.code) == (field, code), e.value


def test_same_messages_on_both_apis(backend, server, tokenizer):
    http = error(post(server, CHAT, {'messages': USER, 'reasoning': {'max_tokens': -1}}))
    with pytest.raises(InvalidRequest) as e:
        build_request(pb.GenerateRequest(text='x', reasoning_budget=-1), tokenizer, LIMITS)
    assert http['message'].replace('reasoning.max_tokens', 'reasoning_budget') == str(e.value)
    http = error(post(server, CHAT, {'messages': USER, 'structured_outputs': {'regex': '(a'}}))
    with pytest.raises(InvalidRequest) as e:
        build_request(pb.GenerateRequest(text='x', regex='(a'), tokenizer, LIMITS)
    assert http['message'].replace('structured_outputs', 'regex') == str(e.value)
    assert http['code'] == e.value.code


@pytest.fixture
def grpc_server(tokenizer):
    """A GlmServer over a stand-in engine, whose orchestrator's submit records the request
    and answers at once: what reaches the engine side, without an engine."""
    cfg = GlmConfig.from_hf(DEMO_MODEL)
    engine = types.SimpleNamespace(max_batch=2, capacity=128, max_seq_len=128,
                                   steps_per_call=1)
    server = GlmServer(engine, tokenizer, cfg, 'demo', 4).start()
    server.ready, submitted = True, []

    def submit(req):
        submitted.append(req)
        req.out.put(Chunk(finish_reason='stop', prompt_tokens=len(req.prompt)))

    server.orchestrator.submit = submit
    channel = grpc.insecure_channel(f'127.0.0.1:{server.port}')
    yield pb_grpc.GlmStub(channel), submitted, server
    channel.close()
    server.grpc.stop(grace=0).wait()


def test_grpc_constraints_reach_the_engine_and_unenforceable_ones_do_not(grpc_server):
    stub, submitted, server = grpc_server
    with pytest.raises(grpc.RpcError) as e:  # a schema it cannot enforce
        list(stub.Generate(pb.GenerateRequest(text='x', json_schema='{"not": {}}'), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and '"not"' in e.value.details()
    assert submitted == []
    request = pb.GenerateRequest(text='<|user|>\nhi<|assistant|>', json_object=True,
                                 reasoning_budget=16)
    responses = list(stub.Generate(request, timeout=30))
    assert responses[-1].finish_reason == pb.STOP and len(submitted) == 1
    assert submitted[0].matcher is not None
