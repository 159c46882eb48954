"""The shipped demo model through the real server: it calls the right tool with arguments
that fit the tool's schema, and the README's first request gets readable text back."""

import json
import random

import httpx
import pytest

from glmjax import corpus
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.server import DEMO_NAME, load_model, start_http
from glmjax.serving.service import GlmServer

TIMEOUT = 120


@pytest.fixture(scope='module')
def url():
    cfg, params, tok, name = load_model()
    assert name == DEMO_NAME
    server = GlmServer(PagedEngine(cfg, params, 4, 512, 8), tok, cfg, name, 64).start()
    server.warmup()
    front = start_http(server, None, '127.0.0.1', 0)
    yield f'http://127.0.0.1:{front.port}'
    front.stop()
    server.shutdown(grace=5)


def chat(url, messages, **fields):
    r = httpx.post(url + '/v1/chat/completions', timeout=TIMEOUT, json={
        'model': DEMO_NAME, 'messages': messages, 'temperature': 0, 'max_tokens': 96,
        **fields})
    assert r.status_code == 200, r.text
    return r.json()['choices'][0]


def test_held_out_tool_prompts_call_the_right_tool(url):
    rng = random.Random(16)
    prompts = [corpus.tool_prompt(rng, held=True) for _ in range(30)]
    good = 0
    for p in prompts:
        choice = chat(url, [{'role': 'user', 'content': p.user}], tools=corpus.TOOLS,
                      reasoning={'enabled': False})
        calls = choice['message'].get('tool_calls') or []
        if calls and calls[0]['function']['name'] == p.name:
            arguments = json.loads(calls[0]['function']['arguments'])
            good += not corpus.schema_errors(p.name, arguments)
    assert good >= 0.8 * len(prompts), f'{good} of {len(prompts)}'


def test_thinking_on_renders_and_parses(url):
    choice = chat(url, [{'role': 'user', 'content': 'What is the weather in Oslo?'}],
                  tools=corpus.TOOLS)
    message = choice['message']
    assert message['reasoning'] or message.get('tool_calls') or message['content']


def test_the_readme_request_gets_readable_text(url):
    text = chat(url, [{'role': 'user', 'content': 'Hi'}])['message']['content'] or ''
    assert text.strip() and '\ufffd' not in text
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.7 * len(text)


def test_the_converted_demo_model_gives_the_same_tokens(tmp_path):
    from glmjax import generate
    from glmjax.convert.convert import convert
    from glmjax.serving.server import DEMO_MODEL
    convert(DEMO_MODEL, str(tmp_path / 'orbax'), dtype='fp32')
    cfg, params, tok, _ = load_model()
    cfg2, params2, tok2, _ = load_model(checkpoint=str(tmp_path / 'orbax'), dtype='float32')
    prompt = tok.encode('def fibonacci(n):')
    assert tok2.encode('def fibonacci(n):') == prompt
    assert generate(cfg2, params2, [prompt], 24) == generate(cfg, params, [prompt], 24)
