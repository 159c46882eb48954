"""Hostile and odd input over HTTP: every malformed request is a 4xx naming its field, the
limits hold, fields the server cannot honour are refused, and the key guards every path."""

import concurrent.futures
import shutil
import socket
import ssl
import subprocess
import time

import httpx
import pytest
from fake_backend import FakeBackend, serve

from glmjax.serving.http_server import HttpServer
from glmjax.serving.openai_api import ApiError, make_app

USER = [{'role': 'user', 'content': 'Hi'}]
TOOLS = [{'type': 'function', 'function': {'name': 'get_weather', 'parameters': {
    'type': 'object', 'properties': {'city': {'type': 'string'}}}}}]
CHAT = '/v1/chat/completions'


@pytest.fixture(scope='module')
def server():
    backend = FakeBackend()
    with serve(make_app(backend, max_body_bytes=1 << 20)) as url:
        yield backend, url


@pytest.fixture
def backend(server):
    b = server[0]
    b.script, b.requests = 'Hello.', []
    return b


def post(server, path, body, **kwargs):
    if isinstance(body, (bytes, str)):
        return httpx.post(server[1] + path, content=body, timeout=30,
                          headers={'content-type': 'application/json'}, **kwargs)
    return httpx.post(server[1] + path, json=body, timeout=30, **kwargs)


MALFORMED = [
    ({'messages': [{'role': 'user', 'content': [{'type': ['text'], 'text': 'x'}]}]},
     'messages[0].content[0]'),
    ({'messages': [{'role': 'user', 'content': [{'type': {'a': 1}}]}]},
     'messages[0].content[0]'),
    ({'messages': [{'role': ['user'], 'content': 'x'}]}, 'messages[0].role'),
    ({'messages': USER, 'logit_bias': {'\u00b2': 1.0}}, 'logit_bias'),
    ({'messages': USER, 'logit_bias': {'\u0663': 1.0}}, 'logit_bias'),
    ({'messages': USER, 'logit_bias': {'5': 300.0}}, 'logit_bias[5]'),
    ({'messages': USER, 'tools': TOOLS, 'tool_choice': {'type': 'function',
                                                        'function': 'get_weather'}},
     'tool_choice'),
    ({'messages': USER, 'chat_template_kwargs': {'messages': []}},
     'chat_template_kwargs.messages'),
    ({'messages': USER, 'chat_template_kwargs': {'add_generation_prompt': False}},
     'chat_template_kwargs.add_generation_prompt'),
    ({'messages': USER, 'top_k': 2 ** 70}, 'top_k'),
    ({'messages': USER, 'seed': 2 ** 90}, 'seed'),
    ({'messages': USER, 'temperature': 1e300}, 'temperature'),
    ({'messages': USER, 'max_tokens': 0}, 'max_tokens'),
    ({'messages': USER, 'stop': ['x'] * 17}, 'stop'),
    ({'messages': USER, 'stop': ['y' * 300]}, 'stop[0]'),
    ({'messages': USER, 'logprobs': True, 'top_logprobs': 21}, 'top_logprobs'),
    ({'messages': USER, 'tools': TOOLS * 129}, 'tools'),
]


@pytest.mark.parametrize('body,param', MALFORMED, ids=[p for _, p in MALFORMED])
def test_malformed_fields_are_400s_naming_the_field(server, body, param):
    r = post(server, CHAT, body)
    assert r.status_code == 400, r.text
    assert r.json()['error']['param'] == param, r.text


def test_lone_surrogate_is_a_400(server):
    # Valid JSON (an escaped lone surrogate), but no UTF-8 string: it cannot be tokenized.
    r = post(server, CHAT, '{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert r.status_code == 400, r.text
    assert r.json()['error']['param'] == 'messages[0].content'
    r = post(server, '/v1/completions', '{"prompt": "x", "stop": ["\\udfff"]}')
    assert r.status_code == 400 and r.json()['error']['param'] == 'stop[0]', r.text


def test_same_messages_as_grpc_for_the_same_fault(server):
    r = post(server, CHAT, {'messages': USER, 'top_p': 1.5})
    assert r.json()['error']['message'] == 'top_p: must be in (0, 1], got 1.5'


def test_developer_role_is_system(backend, server):
    r = post(server, CHAT, {'messages': [{'role': 'developer', 'content': 'Be brief.'}] + USER})
    assert r.status_code == 200, r.text
    prompt = backend.decode(backend.requests[0].prompt_ids)
    assert '<|system|>\nBe brief.' in prompt


def test_unknown_model_is_404(server):
    r = post(server, CHAT, {'model': 'gpt-4o', 'messages': USER})
    assert r.status_code == 404
    err = r.json()['error']
    assert err['code'] == 'model_not_found' and err['param'] == 'model'
    assert "'glm-fake'" in err['message']
    assert post(server, '/v1/embeddings', {'model': 'x', 'input': 'a'}).status_code == 404
    assert post(server, CHAT, {'model': 'm', 'messages': USER}).status_code == 200


@pytest.mark.parametrize('extra,param', [
    ({'response_format': {'type': 'json_object'}}, 'response_format'),
    ({'response_format': {'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {}}}},
     'response_format'),
    ({'tools': TOOLS, 'tool_choice': 'required'}, 'tool_choice'),
    ({'tools': TOOLS, 'tool_choice': {'type': 'function',
                                      'function': {'name': 'get_weather'}}}, 'tool_choice'),
    ({'guided_regex': 'a+'}, 'guided_regex'),
])
def test_constraints_without_a_grammar_compiler_are_refused(backend, server, extra, param):
    """This backend has no tokenizer to build a grammar compiler from."""
    r = post(server, CHAT, {'messages': USER, **extra})
    assert r.status_code == 400, r.text
    assert r.json()['error']['code'] == 'unsupported_field'
    assert r.json()['error']['param'] == param
    assert backend.requests == []
    ok = post(server, CHAT, {'messages': USER, 'response_format': {'type': 'text'}})
    assert ok.status_code == 200


def test_a_safety_model_not_served_is_named(server):
    for path, body in ((CHAT, {'messages': USER}), ('/v1/completions', {'prompt': 'hi'})):
        r = post(server, path, {**body, 'safety_model': 'zai-org/GLM-4.6'})
        assert r.status_code == 400, r.text
        err = r.json()['error']
        assert (err['code'], err['param']) == ('model_not_found', 'safety_model')
        assert "'zai-org/GLM-4.6'" in err['message'] and "'glm-fake'" in err['message']


def test_a_large_body_is_refused_at_once_while_health_answers(server):
    big = b'{"messages": [{"role": "user", "content": "' + b'x' * (20 << 20) + b'"}]}'
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        refused = pool.submit(post, server, CHAT, big)
        health = [httpx.get(server[1] + '/health', timeout=5).status_code for _ in range(5)]
        r = refused.result()
        elapsed = time.monotonic() - start
    assert r.status_code == 413 and r.json()['error']['code'] == 'request_too_large'
    assert health == [200] * 5
    assert elapsed < 5


def test_a_chunked_body_over_the_limit_is_refused(server):
    def pieces():
        for _ in range(40):
            yield b'x' * (64 << 10)
    r = httpx.post(server[1] + CHAT, content=pieces(), timeout=30,
                   headers={'content-type': 'application/json'})
    assert r.status_code == 413


def test_too_many_embedding_inputs(server):
    r = post(server, '/v1/embeddings', {'input': ['a'] * 257})
    assert r.status_code == 400 and r.json()['error']['param'] == 'input'


class BusyBackend(FakeBackend):
    def generate_all(self, requests):
        raise ApiError(429, 'busy', code='queue_full', kind='rate_limit_error', retry_after=1)


def test_429_carries_retry_after():
    with serve(make_app(BusyBackend())) as url:
        r = httpx.post(url + CHAT, json={'messages': USER}, timeout=10)
    assert r.status_code == 429 and r.headers['retry-after'] == '1'


def test_the_key_guards_every_path_but_health():
    with serve(make_app(FakeBackend(), api_key='secret')) as url:
        for path in ('/metrics', '/docs', '/openapi.json', '/v1/models', '/redoc'):
            assert httpx.get(url + path, timeout=10).status_code == 401, path
            wrong = httpx.get(url + path, timeout=10, headers={'Authorization': 'Bearer no'})
            assert wrong.status_code == 401, path
            assert httpx.get(url + path, timeout=10,
                             headers={'Authorization': 'bearer secret'}).status_code == 200
        assert httpx.get(url + '/health', timeout=10).status_code == 200
        assert httpx.post(url + CHAT, json={'messages': USER}, timeout=10,
                          headers={'Authorization': 'Basic secret'}).status_code == 401


@pytest.mark.skipif(shutil.which('openssl') is None, reason='needs openssl for a test cert')
def test_http_over_tls(tmp_path):
    cert, key = tmp_path / 'cert.pem', tmp_path / 'key.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key,
                    '-out', cert, '-days', '1', '-subj', '/CN=localhost',
                    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'],
                   check=True, capture_output=True)
    http = HttpServer(FakeBackend(), '127.0.0.1', 0, tls_files=(str(cert), str(key))).start()
    try:
        url = f'https://127.0.0.1:{http.port}'
        context = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(url + '/health', verify=context, timeout=10).status_code == 200
        with socket.create_connection(('127.0.0.1', http.port)) as plain:
            plain.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
            assert not plain.recv(100).startswith(b'HTTP/1.1 200')
    finally:
        http.stop()


@pytest.mark.parametrize('path, body', [('/v1/embeddings', {'input': 'a'}),
                                        ('/v1/rerank', {'query': 'a', 'documents': ['b']})])
def test_a_client_that_leaves_cancels_its_embedding_call(path, body):
    """The handler awaiting the engine is cancelled once the client disconnects (the engine
    then computes no more of the call), as a completion's is."""
    import asyncio
    import threading

    class Slow(FakeBackend):
        def __init__(self):
            super().__init__()
            self.started, self.cancelled = threading.Event(), threading.Event()

        async def embed(self, prompts):
            self.started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

    slow = Slow()
    with serve(make_app(slow)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + path, json=body, timeout=httpx.Timeout(30, read=1.0))
        assert slow.started.is_set()
        assert slow.cancelled.wait(10)
