"""Constrained decoding end to end, through the paged engine behind the real servers, with
random weights (where an unconstrained model writes noise): every sampled output follows
its schema, regex or choice, forced tool calls parse with schema-valid arguments, and a
reasoning budget caps the thinking; a request beside them decodes as it would alone."""

import concurrent.futures
import json
import re
import time

import grpc
import httpx
import jsonschema
import pytest

from glmjax import generate
from glmjax.serving import paged_engine
from glmjax.serving.moderation import Moderation, Screen
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.server import start_http
from glmjax.serving.service import GlmServer

TIMEOUT = 300
SCHEMAS = [
    {'type': 'object', 'properties': {  # nested objects, required and optional fields
        'name': {'type': 'string', 'maxLength': 8},
        'owner': {'type': 'object', 'properties': {'id': {'type': 'integer', 'minimum': 0,
                                                          'maximum': 999}},
                  'required': ['id']}},
     'required': ['owner'], 'additionalProperties': False},
    {'type': 'array', 'items': {'type': 'object', 'properties': {  # arrays of item schemas
        'x': {'type': 'integer', 'minimum': -9, 'maximum': 9}}, 'required': ['x'],
        'additionalProperties': False}, 'minItems': 1, 'maxItems': 3},
    {'type': 'object', 'properties': {'color': {'enum': ['red', 'green', 'blue']},
                                      'n': {'const': 3}},
     'required': ['color', 'n'], 'additionalProperties': False},  # enums
    {'type': 'object', 'properties': {'ok': {'type': 'boolean'},  # numbers and booleans
                                      'score': {'type': 'number', 'minimum': 0, 'maximum': 1},
                                      'count': {'type': 'integer', 'minimum': 1,
                                                'maximum': 5}},
     'required': ['ok', 'score', 'count'], 'additionalProperties': False},
    {'type': 'object', 'properties': {'tags': {'type': 'array', 'maxItems': 2, 'items': {
        'type': 'string', 'pattern': '^[a-z]{1,4}$'}}}, 'required': ['tags'],
     'additionalProperties': False},
]
TOOLS = [{'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'the weather in a city',
    'parameters': {'type': 'object', 'properties': {
        'city': {'type': 'string', 'maxLength': 12},
        'days': {'type': 'integer', 'minimum': 1, 'maximum': 7}},
        'required': ['city', 'days'], 'additionalProperties': False}}}]


@pytest.fixture(scope='module')
def served(model):
    cfg, params, tok = model
    engine = PagedEngine(cfg, params, 4, 1280, 4, page_size=16, max_num_batched_tokens=64)
    server = GlmServer(engine, tok, cfg, 'paged', 64).start()
    server.warmup()
    front = start_http(server, None, '127.0.0.1', 0)
    channel = grpc.insecure_channel(f'127.0.0.1:{server.port}')
    yield server, f'http://127.0.0.1:{front.port}', pb_grpc.GlmStub(channel), front
    channel.close()
    front.stop()
    server.shutdown(grace=5)


def chat(url, **body):
    body = {'model': 'paged', 'messages': [{'role': 'user', 'content': 'Answer in JSON.'}],
            'temperature': 1.0, 'max_tokens': 1000,
            'chat_template_kwargs': {'enable_thinking': False}} | body
    r = httpx.post(url + '/v1/chat/completions', json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()['choices']


def stream_text(url, **body) -> list[str]:
    body = {'model': 'paged', 'prompt': 'JSON:', 'temperature': 1.0, 'max_tokens': 1000,
            'stream': True} | body
    texts = {}
    with httpx.stream('POST', url + '/v1/completions', json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith('data: {'):
                for c in json.loads(line[6:])['choices']:
                    texts[c['index']] = texts.get(c['index'], '') + c['text']
    return [texts[i] for i in sorted(texts)]


@pytest.mark.parametrize('schema', SCHEMAS)
def test_sampled_outputs_follow_the_schema(served, schema):
    _, url, _, _ = served
    fmt = {'type': 'json_schema', 'json_schema': {'name': 'out', 'schema': schema}}
    choices = chat(url, response_format=fmt, n=4, seed=1)
    outs = [c['message']['content'] for c in choices]
    outs += stream_text(url, response_format=fmt, n=2, seed=2)  # streamed, the same
    assert all(c['finish_reason'] == 'stop' for c in choices), choices
    for text in outs:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(outs)) > 1  # sampled, not one fixed answer


def test_json_object_regex_and_choice(served):
    _, url, stub, _ = served
    for c in chat(url, response_format={'type': 'json_object'}, n=4, seed=3):
        assert isinstance(json.loads(c['message']['content']), dict)
    texts = stream_text(url, structured_outputs={'regex': '[a-c]{2,5}-[0-9]{1,3}'}, n=4,
                        seed=4)
    assert all(re.fullmatch('[a-c]{2,5}-[0-9]{1,3}', t) for t in texts), texts
    words = ['alpha', 'beta', 'gamma']
    for seed in range(4):  # and over gRPC
        req = pb.GenerateRequest(text='pick:', max_tokens=20, choice=pb.ChoiceList(
            choices=words), sampling=pb.SamplingParams(temperature=1.0, seed=seed))
        text = ''.join(r.text for r in stub.Generate(req, timeout=TIMEOUT))
        assert text in words


def test_required_tool_choice_always_calls_a_tool(served):
    _, url, _, _ = served
    schema = TOOLS[0]['function']['parameters']
    for tool_choice in ('required', {'type': 'function', 'function': {'name': 'get_weather'}}):
        choices = chat(url, tools=TOOLS, tool_choice=tool_choice, n=4, seed=5, max_tokens=600)
        for c in choices:
            calls = c['message']['tool_calls']
            assert c['finish_reason'] == 'tool_calls' and calls, c
            for call in calls:
                assert call['function']['name'] == 'get_weather'
                jsonschema.validate(json.loads(call['function']['arguments']), schema)
    # Streamed: the calls' deltas add up to the same, a parseable call every time.
    body = {'model': 'paged', 'messages': [{'role': 'user', 'content': 'Answer in JSON.'}],
            'temperature': 1.0, 'max_tokens': 600, 'tools': TOOLS, 'tool_choice': 'required',
            'stream': True, 'n': 2, 'seed': 6, 'chat_template_kwargs': {'enable_thinking': False}}
    calls, finishes = {}, {}
    with httpx.stream('POST', url + '/v1/chat/completions', json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith('data: {'):
                continue
            for c in json.loads(line[6:])['choices']:
                finishes[c['index']] = c['finish_reason'] or finishes.get(c['index'])
                for d in c['delta'].get('tool_calls') or []:
                    call = calls.setdefault((c['index'], d['index']), {'name': '', 'args': ''})
                    call['name'] += d['function'].get('name') or ''
                    call['args'] += d['function']['arguments']
    assert finishes == {0: 'tool_calls', 1: 'tool_calls'}
    assert {choice for choice, _ in calls} == {0, 1}
    for call in calls.values():
        assert call['name'] == 'get_weather'
        jsonschema.validate(json.loads(call['args']), schema)


def test_a_reasoning_budget_caps_the_thinking(served):
    """At most `budget` reasoning tokens, then </think> and an answer that follows the
    constraint; over HTTP the reasoning and the answer come apart at it."""
    server, url, stub, _ = served
    budget, end = 6, server.tokenizer.token_id('</think>')
    schema = SCHEMAS[2]  # bounded: random weights write long strings where they may
    for seed in range(3):
        req = pb.GenerateRequest(text='<|user|>\nhi<|assistant|>', json_schema=json.dumps(schema),
                                 reasoning_budget=budget, max_tokens=1000,
                                 sampling=pb.SamplingParams(temperature=1.0, seed=seed))
        responses = list(stub.Generate(req, timeout=TIMEOUT))
        ids = [t for r in responses for t in r.token_ids]
        assert ids.index(end) <= budget
        answer = ''.join(r.text for r in responses).split('</think>', 1)[1]
        jsonschema.validate(json.loads(answer), schema)
    fmt = {'type': 'json_schema', 'json_schema': {'name': 'out', 'schema': schema}}
    for c in chat(url, response_format=fmt, n=2, seed=6,
                  chat_template_kwargs={'enable_thinking': True},
                  reasoning={'max_tokens': budget}, max_tokens=1000):
        assert c['message']['reasoning_content']
        jsonschema.validate(json.loads(c['message']['content']), schema)


def test_an_unconstrained_request_beside_them_is_unchanged(served, model):
    cfg, params, _ = model
    server, url, stub, _ = served
    prompt = list(range(3, 40))
    alone = generate(cfg, params, [prompt], 24, stop_ids=())[0]
    plain = pb.GenerateRequest(token_ids=prompt, max_tokens=24, ignore_eos=True,
                               sampling=pb.SamplingParams(temperature=0.0))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        side = [pool.submit(chat, url, response_format={'type': 'json_object'}, n=1, seed=s)
                for s in (7, 8)]
        got = [t for r in stub.Generate(plain, timeout=TIMEOUT) for t in r.token_ids]
        for f in side:
            json.loads(f.result()[0]['message']['content'])
    assert got == alone


def test_masks_are_filled_while_the_forward_runs(served, monkeypatch):
    """While a request is constrained, each step's forward is dispatched before the host
    fetches the previous step's tokens (and fills the masks from them), and its sampling
    after: the device has the forward to run while the host works, so no request beside a
    constrained one waits on a host round trip."""
    server, _, stub, _ = served
    log = []

    def settle():
        # A request is answered before the engine is done with it (a constrained one ends
        # on the device one call after its stop token): wait until every slot is free, so
        # that no call is half-way.
        end = time.monotonic() + TIMEOUT
        while any(server.orchestrator.stats()[k] for k in ('busy_slots', 'queued')) \
                and time.monotonic() < end:
            time.sleep(0.01)

    settle()  # the next forward is this test's

    def traced(name, fn):
        def call(*args, **kwargs):
            log.append(name)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(paged_engine, '_mixed_forward',
                        traced('forward', paged_engine._mixed_forward))
    monkeypatch.setattr(paged_engine, '_mixed_sample',
                        traced('sample', paged_engine._mixed_sample))
    orch = server.orchestrator
    emit = orch._emit
    monkeypatch.setattr(orch, '_emit', lambda outputs: (outputs and log.append('fetch'),
                                                         emit(outputs))[1])
    req = pb.GenerateRequest(text='pick:', max_tokens=20, regex='[a-c]{12}',
                             sampling=pb.SamplingParams(temperature=1.0, seed=9))
    responses = list(stub.Generate(req, timeout=TIMEOUT))
    text, n = ''.join(r.text for r in responses), sum(len(r.token_ids) for r in responses)
    assert re.fullmatch('[a-c]{12}', text), text
    settle()  # every call of this request has logged all it does
    steps = ''.join({'forward': 'F', 'fetch': 'T', 'sample': 'S'}[e] for e in log)
    # (A fetch of the last test's last call may come first, or inside the first step.) The
    # first step (the prompt) samples the first token with no tokens before it; each later
    # one, one more token, fetching its predecessor's between its forward and its sampling;
    # once the request is done on the device, plain calls fetch the last ones.
    found = re.fullmatch('T?FT?S((?:FTS)+)T*', steps)
    assert found and len(found[1]) // 3 >= n - 1, (steps, n)


def moderated(served, prompt, response, window=64):
    """Both fronts' safety_model classifier with fixed verdicts: each stage may give only
    the one choice, so the decision is known whatever the weights."""
    server, url, _, front = served
    server.moderation = front.backend.moderation = Moderation.parse({
        'system': 'Classify.', 'prompt': {'user': 'User said: {content}', 'choices': [prompt]},
        'response': {'user': 'Then: {content}', 'choices': [response]},
        'stream_window': window})
    return url


def generate_rpc(stub, **fields) -> list:
    fields = {'text': 'JSON:', 'max_tokens': 12, 'ignore_eos': True} | fields
    req = pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0.0), **fields)
    return list(stub.Generate(req, timeout=TIMEOUT))


GREEDY = {'temperature': 0.0, 'max_tokens': 12, 'ignore_eos': True}


def test_safety_model_answers_a_safe_request_as_without_it(served):
    url = moderated(served, 'safe', 'safe')
    plain = chat(url, **GREEDY)[0]
    checked = chat(url, safety_model='paged', **GREEDY)[0]
    assert checked == plain and plain['finish_reason'] == 'length'
    texts = stream_text(url, safety_model='paged', **GREEDY)
    assert texts == stream_text(url, **GREEDY)


def test_safety_model_refuses_an_unsafe_prompt(served):
    url = moderated(served, 'unsafe: violence', 'safe')
    for path, body in (('/v1/chat/completions', {'messages': [{'role': 'user',
                                                               'content': 'hi'}]}),
                       ('/v1/completions', {'prompt': 'hi'})):
        r = httpx.post(url + path, json={**body, 'safety_model': 'paged', **GREEDY},
                       timeout=TIMEOUT)
        assert r.status_code == 400, r.text
        err = r.json()['error']
        assert (err['code'], err['param']) == ('content_policy_violation', 'safety_model')
        assert 'violence' in err['message']


def test_safety_model_filters_an_unsafe_answer(served):
    url = moderated(served, 'safe', 'unsafe: crime')
    [c] = chat(url, safety_model='paged', **GREEDY)
    assert c['finish_reason'] == 'content_filter' and c['message']['content'] is None
    body = {'model': 'paged', 'prompt': 'JSON:', 'stream': True, 'safety_model': 'paged',
            **GREEDY}
    with httpx.stream('POST', url + '/v1/completions', json=body, timeout=TIMEOUT) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith('data: {')]
    # 12 tokens, within one stream_window: all held back, nothing of it sent.
    assert [(c['finish_reason'], c['text']) for e in events for c in e['choices']] == [
        ('content_filter', '')]


def test_safety_model_over_grpc(served):
    """The same checks as HTTP's: a safe request is answered as without them, an unsafe
    prompt is INVALID_ARGUMENT with its code, an unsafe answer ends CONTENT_FILTER with
    none of its text or tokens, and a name not served is refused naming it."""
    _, _, stub, _ = served
    assert stub.GetModelInfo(pb.ModelInfoRequest()).served_names == ['paged']
    moderated(served, 'safe', 'safe')
    plain = generate_rpc(stub)
    assert generate_rpc(stub, safety_model='paged') == plain
    assert plain[-1].finish_reason == pb.LENGTH
    moderated(served, 'unsafe: violence', 'safe')
    with pytest.raises(grpc.RpcError) as e:
        generate_rpc(stub, safety_model='paged')
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'violence' in e.value.details()
    assert ('glmjax-error-code', 'content_policy_violation') in e.value.trailing_metadata()
    moderated(served, 'safe', 'unsafe: crime')
    [last] = generate_rpc(stub, safety_model='paged')  # 12 tokens: one window, all held
    assert last.finish_reason == pb.CONTENT_FILTER and last.stop_reason == 'safety_model: crime'
    assert (last.text, list(last.token_ids)) == ('', [])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        plain[-1].usage.prompt_tokens, 12)
    with pytest.raises(grpc.RpcError) as e:
        generate_rpc(stub, safety_model='zai-org/GLM-4.6')
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'zai-org/GLM-4.6' is not served" in e.value.details()


def test_a_stream_sends_only_what_was_classified_safe(served, monkeypatch):
    """A streamed answer is classified every stream_window tokens: what reaches the client
    is exactly the answer as of the last safe verdict, and the first unsafe one stops it.
    (The verdict is swapped for one that reads the answer's length: unsafe past half the
    whole answer; the engine's verdicts are the tests above.)"""
    from glmjax.serving.http_moderation import Moderator
    from glmjax.serving.service import GlmServicer
    server, url, stub, _ = served
    url = moderated(served, 'safe', 'safe', window=3)
    long = {'temperature': 0.0, 'max_tokens': 48, 'ignore_eos': True}
    whole_http = stream_text(url, **long)[0]
    whole_rpc = ''.join(r.text for r in generate_rpc(stub, max_tokens=48))
    assert whole_http == whole_rpc and len(whole_http) > 40
    half, seen = len(whole_http) // 2, []
    limit = {'chars': half}

    def verdict(stage, content):
        answer = content.partition('assistant: ')[2]
        seen.append(answer)
        return 'crime' if stage == 'response' and len(answer) > limit['chars'] else None

    async def http_verdict(self, stage, content):
        return verdict(stage, content)

    monkeypatch.setattr(Moderator, 'verdict', http_verdict)
    monkeypatch.setattr(GlmServicer, '_verdict',
                        lambda self, classifier, stage, content, *_: verdict(stage, content))
    orch, submitted = server.orchestrator, []
    submit, submit_all = orch.submit, orch.submit_all
    monkeypatch.setattr(orch, 'submit', lambda r: (submitted.append(r), submit(r))[1])
    monkeypatch.setattr(orch, 'submit_all', lambda rs: (submitted.extend(rs), submit_all(rs))[1])

    def stopped():  # the answer's engine request, once over: cut short, not run to its end
        [r] = {id(r): r for r in submitted}.values()  # (submit_all may call submit)
        end = time.monotonic() + TIMEOUT
        while not r.finished and time.monotonic() < end:
            time.sleep(0.01)
        submitted.clear()
        return r.finish_reason
    body = {'model': 'paged', 'prompt': 'JSON:', 'stream': True, 'safety_model': 'paged',
            **long}
    with httpx.stream('POST', url + '/v1/completions', json=body, timeout=TIMEOUT) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith('data: {')]
    sent = ''.join(c['text'] for e in events for c in e['choices'])
    assert events[-1]['choices'][0]['finish_reason'] == 'content_filter'
    answers = seen[1:]  # after the prompt's
    assert len(answers) >= 3 and all(whole_http.startswith(a) for a in answers)
    assert len(answers[-1]) > half and sent == answers[-2] and len(sent) <= half
    assert stopped() == 'cancelled'
    # A cut answer's usage still counts the prompt's cached tokens (known from admission).
    prompt = 'JSON: ' + 'a b c ' * 20  # several pages, cached by the first run
    stream_text(url, prompt=prompt, **long)
    limit['chars'] = 0  # unsafe at the first verdict
    with httpx.stream('POST', url + '/v1/completions', timeout=TIMEOUT, json={
            **body, 'prompt': prompt, 'stream_options': {'include_usage': True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith('data: {')]
    assert events[-2]['choices'][0]['finish_reason'] == 'content_filter'
    assert events[-1]['usage']['prompt_tokens_details']['cached_tokens'] >= 16
    limit['chars'], submitted[:] = half, []
    seen.clear()
    responses = generate_rpc(stub, safety_model='paged', max_tokens=48)
    sent = ''.join(r.text for r in responses)
    answers = seen[1:]
    assert responses[-1].finish_reason == pb.CONTENT_FILTER and len(responses) > 1
    assert len(answers) >= 3 and all(whole_rpc.startswith(a) for a in answers)
    assert len(answers[-1]) > half and sent == answers[-2] and len(sent) <= half
    assert stopped() == 'cancelled'


def test_a_screen_holds_an_answer_until_it_passes():
    screen = Screen(window=4)
    assert screen.push('a', 'ab', 3, False) is None  # 3 tokens: hold
    assert screen.push('b', 'c', 1, False) == 'abc'  # 4: classify all so far
    assert screen.passed() == ['a', 'b'] and screen.held == []
    assert screen.push('c', '', 0, True) is None  # the end, nothing new: passes unasked
    assert screen.passed() == ['c']
    whole = Screen(window=None)
    assert whole.push('a', 'x' * 100, 100, False) is None
    assert whole.push('b', 'y', 1, True) == 'x' * 100 + 'y'


def test_the_moderation_file_is_checked(tmp_path):
    default = Moderation.load()
    assert default.choices['prompt'][0] == 'safe' and '{content}' in default.user['response']
    bad = tmp_path / 'm.json'
    bad.write_text(json.dumps({'prompt': {'user': 'no placeholder'}, 'response': {
        'user': '{content}'}, 'choices': ['safe']}))
    with pytest.raises(ValueError, match='"prompt" must be an object whose "user"'):
        Moderation.load(str(bad))
    bad.write_text(json.dumps({'prompt': {'user': '{content}'}, 'response': {
        'user': '{content}'}, 'choices': ['fine']}))
    with pytest.raises(ValueError, match='choices of "prompt"'):
        Moderation.load(str(bad))
    bad.write_text(json.dumps({'prompt': {'user': '{content}'}, 'response': {
        'user': '{content}'}, 'choices': ['safe'], 'stream_window': 0}))
    with pytest.raises(ValueError, match='"stream_window" must be a whole number'):
        Moderation.load(str(bad))
    assert default.stream_window == 64
