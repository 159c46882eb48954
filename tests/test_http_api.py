"""The OpenAI/Together HTTP API against a hand-computable backend, driven by both SDKs."""

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import together
from fake_backend import FakeBackend, serve
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from together.types.chat import ChatCompletion as TogetherChat
from together.types.rerank_create_response import RerankCreateResponse

from glmjax.serving.openai_api import make_app

THINK_CALL = ('\n<think>I need the weather.</think>\nLet me check.<tool_call>get_weather\n'
              '<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n'
              '<arg_value>3</arg_value>\n</tool_call>')
TOOLS = [{'type': 'function', 'function': {
    'name': 'get_weather', 'parameters': {'type': 'object', 'properties': {
        'city': {'type': 'string'}, 'days': {'type': 'integer'}}}}}]
USER = [{'role': 'user', 'content': 'Weather in Paris?'}]


@pytest.fixture(scope='module')
def server():
    backend = FakeBackend()
    with serve(make_app(backend)) as url:
        yield backend, url


@pytest.fixture
def backend(server):
    b = server[0]
    b.script, b.is_ready, b.requests = 'Hello.', True, []
    return b


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + '/v1', api_key='none', max_retries=0)


def post(server, path, body, **kw):
    return httpx.post(server[1] + path, content=body if isinstance(body, str) else None,
                      json=None if isinstance(body, str) else body, timeout=30, **kw)


def test_chat_with_reasoning_and_tool_call(backend, client):
    backend.script = THINK_CALL
    r = client.chat.completions.create(model='glm-fake', messages=USER, tools=TOOLS)
    ChatCompletion.model_validate(r.model_dump())
    m = r.choices[0].message
    assert m.content == 'Let me check.'
    assert m.model_extra['reasoning_content'] == 'I need the weather.'
    assert m.model_extra['reasoning'] == 'I need the weather.'
    assert r.choices[0].finish_reason == 'tool_calls'
    call = m.tool_calls[0]
    assert call.function.name == 'get_weather' and call.id.startswith('call_')
    assert json.loads(call.function.arguments) == {'city': 'Paris', 'days': 3}
    prompt = backend.chat_template.render(USER, tools=TOOLS)
    assert r.usage.prompt_tokens == len(backend.encode(prompt))
    assert r.usage.completion_tokens == len(THINK_CALL)
    assert backend.requests[0].prompt_ids == backend.encode(prompt)


def test_streamed_chat_adds_up_to_the_whole(backend, client):
    backend.script = THINK_CALL
    whole = client.chat.completions.create(model='m', messages=USER, tools=TOOLS)
    stream = client.chat.completions.create(model='m', messages=USER, tools=TOOLS, stream=True,
                                            stream_options={'include_usage': True})
    content, reasoning, args, names, finish, usage = '', '', {}, {}, None, None
    for chunk in stream:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            content += d.content or ''
            reasoning += (d.model_extra or {}).get('reasoning_content') or ''
            for t in d.tool_calls or []:
                if t.function.name:
                    names[t.index] = t.function.name
                args[t.index] = args.get(t.index, '') + (t.function.arguments or '')
            finish = c.finish_reason or finish
    m = whole.choices[0].message
    assert content == m.content and reasoning == m.model_extra['reasoning_content']
    assert names == {0: 'get_weather'} and args[0] == m.tool_calls[0].function.arguments
    assert finish == 'tool_calls'
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_thinking_switches_reach_the_template(backend, client):
    client.chat.completions.create(model='m', messages=USER,
                                   extra_body={'chat_template_kwargs': {'enable_thinking': False}})
    client.chat.completions.create(model='m', messages=USER,
                                   extra_body={'reasoning': {'enabled': False}})
    for r in backend.requests:
        assert backend.decode(r.prompt_ids).endswith('/nothink<|assistant|>\n<think></think>')


def test_reasoning_effort_none_or_high_and_levels_refused(backend, client):
    client.chat.completions.create(model='m', messages=USER, reasoning_effort='none')
    client.chat.completions.create(model='m', messages=USER, reasoning_effort='high')
    nothink, think = (backend.decode(r.prompt_ids) for r in backend.requests)
    assert nothink.endswith('/nothink<|assistant|>\n<think></think>')
    assert think.endswith('<|assistant|>') and '/nothink' not in think
    for effort, extra in (('medium', {}), ('high', {'reasoning': {'enabled': False}})):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model='m', messages=USER, reasoning_effort=effort,
                                           extra_body=extra)
        assert e.value.body['param'] == 'reasoning_effort'


def test_answer_without_thinking_is_content(backend, client):
    backend.script = '\nJust the answer.'
    m = client.chat.completions.create(model='m', messages=USER).choices[0].message
    assert m.content == 'Just the answer.' and m.model_extra['reasoning'] is None


def test_sampling_fields_n_stop_and_length(backend, client):
    backend.script = 'abcdefgh'
    r = client.chat.completions.create(
        model='m', messages=USER, temperature=0.7, top_p=0.9, seed=5, n=2, stop=['ef'],
        presence_penalty=0.5, frequency_penalty=0.25, logit_bias={'17': 3.0},
        extra_body={'top_k': 40, 'min_p': 0.05, 'repetition_penalty': 1.1})
    assert [c.message.content for c in r.choices] == ['abcd', 'abcd']
    assert [c.finish_reason for c in r.choices] == ['stop', 'stop']
    req = backend.requests[0]
    assert (req.temperature, req.top_p, req.top_k, req.min_p) == (0.7, 0.9, 40, 0.05)
    assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty) == (
        0.5, 0.25, 1.1)
    assert req.logit_bias == {17: 3.0} and req.stop == ['ef']
    assert [r.seed for r in backend.requests] == [5, 6]
    r = client.chat.completions.create(model='m', messages=USER, max_tokens=3)
    assert r.choices[0].message.content == 'abc' and r.choices[0].finish_reason == 'length'


def test_logprobs_openai_and_together_styles(backend, client, server):
    backend.script = 'xyz'
    r = client.chat.completions.create(model='m', messages=USER, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == ['x', 'y', 'z']
    assert content[0].top_logprobs[1].token == 'y' and content[0].top_logprobs[1].logprob == -1.5
    raw = post(server, '/v1/chat/completions', {'messages': USER, 'logprobs': 1}).json()
    assert raw['choices'][0]['logprobs']['tokens'] == ['x', 'y', 'z']
    assert raw['choices'][0]['logprobs']['token_logprobs'] == [-0.5] * 3


def test_together_sdk_chat_and_rerank(backend, server):
    # together 3.x puts /v1 in its paths: the base URL is the server root.
    tc = together.Together(api_key='none', base_url=server[1], max_retries=0)
    backend.script = '\n<think>hm</think>\nFine.'
    r = tc.chat.completions.create(model='m', messages=USER)
    TogetherChat.model_validate(r.model_dump())
    assert r.choices[0].message.content == 'Fine.' and r.choices[0].message.reasoning == 'hm'
    docs = ['zzzz', 'Weather in Paris?', 'qqq']
    rr = tc.rerank.create(model='m', query='Weather in Paris?', documents=docs, top_n=2,
                          return_documents=True)
    RerankCreateResponse.model_validate(rr.model_dump())
    assert [x.index for x in rr.results][0] == 1 and len(rr.results) == 2
    assert rr.results[0].relevance_score >= rr.results[1].relevance_score
    assert rr.results[0].document.text == docs[1]
    e = tc.embeddings.create(model='m', input=['ab', 'cd'])
    assert len(e.data) == 2


def test_completions_with_token_ids_echo_and_logprobs(backend, client):
    backend.script = 'ok'
    r = client.completions.create(model='m', prompt=[[72, 105], [65]], echo=True, logprobs=1,
                                  max_tokens=5)
    Completion.model_validate(r.model_dump())
    assert [c.text for c in r.choices] == ['Hiok', 'Aok']
    assert r.choices[0].logprobs.tokens == ['o', 'k']
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 4
    chunks = list(client.completions.create(model='m', prompt='Hi', stream=True))
    assert ''.join(c.choices[0].text for c in chunks) == 'ok'


def test_embeddings_float_and_base64(client):
    f = client.embeddings.create(model='m', input=['hello', 'world'])
    CreateEmbeddingResponse.model_validate(f.model_dump())
    b = client.embeddings.create(model='m', input='hello', encoding_format='base64')
    vec = np.frombuffer(base64.b64decode(b.data[0].embedding), '<f4') \
        if isinstance(b.data[0].embedding, str) else np.asarray(b.data[0].embedding)
    np.testing.assert_allclose(vec, f.data[0].embedding, rtol=1e-6)
    assert abs(np.linalg.norm(f.data[1].embedding) - 1) < 1e-5


def test_models_and_health(backend, client, server):
    assert [m.id for m in client.models.list()] == ['glm-fake', 'm']
    assert post(server, '/health', None).status_code == 405
    assert httpx.get(server[1] + '/health').status_code == 200
    backend.is_ready = False
    r = httpx.get(server[1] + '/health')
    assert r.status_code == 503 and r.json()['error']['message']


def test_metrics_count_tokens(backend, client, server):
    backend.script = 'abc'
    client.chat.completions.create(model='m', messages=USER)
    text = httpx.get(server[1] + '/metrics').text
    for name in ('glmjax:time_to_first_token_seconds_bucket', 'glmjax:e2e_request_latency_seconds',
                 'glmjax:num_requests_waiting 2.0', 'glmjax:kv_cache_usage_perc 0.25',
                 'glmjax:generation_tokens_total', 'glmjax:request_queue_time_seconds'):
        assert name in text


@pytest.mark.parametrize('path, body, status, param', [
    ('/v1/chat/completions', '{"messages": [', 400, None),
    ('/v1/chat/completions', {'messages': USER, 'temperature': 'hot'}, 400, 'temperature'),
    ('/v1/chat/completions', {'messages': USER, 'top_p': 1.5}, 400, 'top_p'),
    ('/v1/chat/completions', {'messages': []}, 400, 'messages'),
    ('/v1/chat/completions', {'messages': [{'role': 'robot', 'content': 'x'}]}, 400,
     'messages[0].role'),
    ('/v1/chat/completions', {'messages': USER + [{'role': 'tool', 'content': 'x'}]}, 400,
     'messages[1].tool_call_id'),
    ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'http://x/y.png'}}]}]}, 400,
     'messages[0].content[0]'),
    ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'x' * 3000}]}, 400,
     'messages'),
    ('/v1/chat/completions', {'messages': USER, 'max_tokens': 5000}, 400, 'max_tokens'),
    ('/v1/chat/completions', {'messages': USER, 'tool_choice': {
        'type': 'function', 'function': {'name': 'nope'}}, 'tools': TOOLS}, 400, 'tool_choice'),
    ('/v1/chat/completions', {'messages': USER, 'logit_bias': {'x': 1}}, 400, 'logit_bias'),
    ('/v1/completions', {'prompt': 'a', 'suffix': 'b'}, 400, 'suffix'),
    ('/v1/completions', {'prompt': [[1, 99999]]}, 400, 'prompt'),
    ('/v1/images/generations', {'prompt': 'a cat'}, 400, None),
    ('/v1/audio/speech', {'input': 'hi'}, 400, None),
    ('/v1/audio/transcriptions', {}, 400, None),
    ('/v2/videos', {'prompt': 'x'}, 400, None),
    ('/v1/nothing', {}, 404, None),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()['error']
    assert set(err) == {'message', 'type', 'param', 'code'} and err['message']
    assert err['param'] == param


def test_unknown_fields_are_ignored(backend, server):
    r = post(server, '/v1/chat/completions', {'messages': USER, 'frobnicate': True})
    assert r.status_code == 200


def test_api_key():
    with serve(make_app(FakeBackend(), api_key='secret')) as url:
        body = {'messages': USER}
        assert httpx.post(url + '/v1/chat/completions', json=body).status_code == 401
        r = httpx.post(url + '/v1/chat/completions', json=body,
                       headers={'Authorization': 'Bearer wrong'})
        assert r.status_code == 401 and r.json()['error']['type'] == 'authentication_error'
        ok = openai.OpenAI(base_url=url + '/v1', api_key='secret', max_retries=0)
        assert ok.chat.completions.create(model='m', messages=USER).choices[0].message.content
        assert httpx.get(url + '/health').status_code == 200
