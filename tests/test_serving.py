"""End to end through the real gRPC server on localhost, over the embedded default model
(tiny GLM-4.6-shaped, random weights, the small GLM-token tokenizer)."""

import collections
import concurrent.futures
import random
import threading
import time
import types

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from glmjax import forward, generate
from glmjax.serving import paged_engine
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.service import GlmServer

MAX_BATCH, MAX_SEQ_LEN, STEPS = 4, 128, 4
RPC_TIMEOUT = 60  # seconds: every call is bounded


class SlowEngine(PagedEngine):
    """A device that takes 0.1 s per call, so that requests stay in their slots a while;
    clearing `running` holds every call until it is set again (however slow the machine)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running = threading.Event()
        self.running.set()

    def generate(self, masks=None):
        self.running.wait()
        time.sleep(0.1)
        return super().generate(masks)


def make_server(model, engine_class=PagedEngine, **kwargs) -> GlmServer:
    cfg, params, tok = model
    eng = engine_class(cfg, params, MAX_BATCH, MAX_SEQ_LEN, STEPS)
    server = GlmServer(eng, tok, cfg, 'test-tiny', kwargs.pop('max_queue', 64), **kwargs)
    server.start().warmup()
    return server


@pytest.fixture(scope='module')
def served(model):
    server = make_server(model)
    channel = grpc.insecure_channel(f'127.0.0.1:{server.port}')
    cfg, params, tok = model
    yield types.SimpleNamespace(cfg=cfg, params=params, tok=tok, server=server, channel=channel,
                                stub=pb_grpc.GlmStub(channel))
    channel.close()
    server.shutdown(grace=5)


def request(prompt, max_tokens=16, stub_kwargs=None, **fields) -> pb.GenerateRequest:
    sampling = fields.pop('sampling', {'temperature': 0.0})
    prompt_field = {'text': prompt} if isinstance(prompt, str) else {'token_ids': prompt}
    return pb.GenerateRequest(max_tokens=max_tokens, sampling=pb.SamplingParams(**sampling),
                              **prompt_field, **fields)


def run(stub, req, timeout=RPC_TIMEOUT, metadata=None) -> tuple[list[int], str, list]:
    """(all token ids, all text, the responses)."""
    responses = list(stub.Generate(req, timeout=timeout, metadata=metadata))
    ids = [t for r in responses for t in r.token_ids]
    return ids, ''.join(r.text for r in responses), responses


def prompts(n: int, seed: int = 0, vocab: int = 700) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(3, 60))] for _ in range(n)]


def wait_idle(stub, timeout=20.0, metadata=None) -> pb.ModelInfo:
    end = time.monotonic() + timeout
    while True:
        info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT, metadata=metadata)
        if info.busy_slots == 0 and info.queued == 0 or time.monotonic() > end:
            return info
        time.sleep(0.05)


def test_health_is_serving_and_reflection_lists_the_services(served):
    health = health_pb2_grpc.HealthStub(served.channel)
    for name in ('', 'glmjax.v1.Glm'):
        r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    answer = next(iter(reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services='')]), timeout=RPC_TIMEOUT)))
    names = {s.name for s in answer.list_services_response.service}
    assert {'glmjax.v1.Glm', 'grpc.health.v1.Health',
            'grpc.reflection.v1alpha.ServerReflection'} <= names


def test_health_is_not_serving_before_warmup(model):
    cfg, params, tok = model
    server = GlmServer(PagedEngine(cfg, params, MAX_BATCH, MAX_SEQ_LEN, STEPS), tok, cfg, 'x',
                       4).start()
    try:
        with grpc.insecure_channel(f'127.0.0.1:{server.port}') as channel:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=RPC_TIMEOUT)
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                run(pb_grpc.GlmStub(channel), request([1, 2, 3]))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.shutdown(grace=1)


def test_greedy_through_grpc_equals_generate(served):
    ps = prompts(3, seed=1)
    expected = generate(served.cfg, served.params, ps, 24)  # each stops at an eos id
    for p, want in zip(ps, expected):
        ids, _, responses = run(served.stub, request(p, max_tokens=24))
        assert ids == want
        last = responses[-1]
        assert last.usage.prompt_tokens == len(p)
        assert last.usage.completion_tokens == len(ids)
        stopped = ids[-1] in served.cfg.eos_token_ids
        assert last.finish_reason == (pb.STOP if stopped else pb.LENGTH)
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    # Without eos ids the stream runs to max_tokens, still the same tokens.
    long = generate(served.cfg, served.params, ps, 24, stop_ids=())
    for p, want in zip(ps, long):
        ids, _, responses = run(served.stub, request(p, max_tokens=24, ignore_eos=True))
        assert ids == want and len(ids) == 24
        assert responses[-1].finish_reason == pb.LENGTH


def test_text_prompt_streams_text_that_decodes_the_tokens(served):
    text = 'The user asks a question; the assistant thinks'
    tokenized = served.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=RPC_TIMEOUT)
    assert list(tokenized.token_ids) == served.tok.encode(text)
    assert ''.join(tokenized.tokens) == ''.join(served.tok.token_strings(tokenized.token_ids))
    ids, streamed, responses = run(served.stub, request(text, max_tokens=40, ignore_eos=True))
    assert len(ids) == 40
    # Every delta is final: their concatenation is the decoding of all tokens at once.
    assert streamed == served.tok.decode(ids)
    assert len(responses) > 3  # streamed step by step, not in one piece


def test_no_recompilation_after_warmup(served):
    fns = (paged_engine._bind, paged_engine._generate, paged_engine._mixed_forward,
           paged_engine._mixed_sample, paged_engine._mark_done)
    before = [f._cache_size() for f in fns]
    for i, p in enumerate(prompts(6, seed=2)):
        run(served.stub, request(p, max_tokens=5 + i, sampling=dict(
            temperature=0.5 + i / 10, top_k=i, top_p=0.9, min_p=0.01 * i, seed=i,
            presence_penalty=0.1 * i, logit_bias={i: 1.0}), stop=['x'] * (i % 2)))
    assert [f._cache_size() for f in fns] == before


def test_32_concurrent_streams_equal_each_run_alone(served):
    rng = random.Random(3)
    reqs = []
    for i, p in enumerate(prompts(32, seed=3)):
        sampling = ({'temperature': 0.0} if i % 2 else
                    {'temperature': 0.9, 'top_p': 0.95, 'seed': i, 'repetition_penalty': 1.1})
        reqs.append(request(p, max_tokens=rng.randrange(4, 30), sampling=sampling,
                            ignore_eos=i % 3 == 0))
    alone = [run(served.stub, r)[0] for r in reqs]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: run(served.stub, r)[0], reqs))
    assert together == alone
    assert len({tuple(t) for t in alone}) == 32  # different requests, different outputs
    assert wait_idle(served.stub).free_slots == MAX_BATCH


def test_top_k_one_equals_greedy_and_seed_reproduces(served):
    p = prompts(1, seed=4)[0]
    greedy = run(served.stub, request(p, 20, ignore_eos=True))[0]
    top1 = run(served.stub, request(p, 20, ignore_eos=True,
                                    sampling=dict(temperature=1.0, top_k=1, seed=9)))[0]
    assert top1 == greedy
    sampled = [run(served.stub, request(p, 20, ignore_eos=True,
                                        sampling=dict(temperature=1.0, seed=s)))[0]
               for s in (11, 11, 12)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]
    assert sampled[0] != greedy


def test_stop_token_ids_end_the_stream(served):
    p = prompts(1, seed=5)[0]
    ids = run(served.stub, request(p, 30, ignore_eos=True))[0]
    stop = ids[6]
    got, _, responses = run(served.stub, request(p, 30, ignore_eos=True, stop_token_ids=[stop]))
    assert got == ids[:ids.index(stop) + 1]
    assert responses[-1].finish_reason == pb.STOP
    assert responses[-1].stop_reason == str(stop)


def test_stop_string_across_tokens_is_caught_and_not_shown(served):
    tok = served.tok
    for p in prompts(8, seed=6):
        ids, text, _ = run(served.stub, request(p, 40, ignore_eos=True))
        # A boundary between two tokens with plain text on both sides.
        cuts = [len(tok.decode(ids[:i])) for i in range(1, len(ids))]
        cuts = [c for c in cuts if 2 <= c <= len(text) - 2
                and '\ufffd' not in text[c - 2:c + 2] and text[:c] == tok.decode(ids)[:c]]
        if cuts:
            break
    else:
        pytest.fail('no output with a clean token boundary to test on')
    stop = text[cuts[0] - 2:cuts[0] + 2]
    got_ids, got, responses = run(served.stub, request(p, 40, ignore_eos=True, stop=[stop]))
    assert got == text[:text.index(stop)]
    assert stop not in got
    assert responses[-1].finish_reason == pb.STOP
    assert responses[-1].stop_reason == stop
    assert got_ids == ids[:len(got_ids)] and len(got_ids) < len(ids)


def test_logprobs_are_the_model_log_softmax(served):
    p = prompts(1, seed=7)[0]
    ids, _, responses = run(served.stub, request(p, 8, ignore_eos=True, top_logprobs=3))
    lps = [lp for r in responses for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == ids
    logits = forward(served.cfg, served.params, jnp.asarray([p + ids], jnp.int32))[0]
    ref = np.asarray(jax.nn.log_softmax(logits[len(p) - 1:-1], axis=-1))
    for i, lp in enumerate(lps):
        assert lp.logprob == pytest.approx(ref[i, ids[i]], abs=1e-4)
        assert len(lp.top) == 3
        assert [t.token_id for t in lp.top] == list(np.argsort(-ref[i])[:3])
        assert lp.top[0].token_id == ids[i]  # greedy
    none = run(served.stub, request(p, 4, ignore_eos=True))[2]
    assert all(len(r.logprobs) == 0 for r in none)


BAD = [
    (dict(sampling=dict(temperature=-1.0)), 'sampling.temperature'),
    (dict(sampling=dict(top_p=1.5)), 'sampling.top_p'),
    (dict(sampling=dict(top_p=0.0)), 'sampling.top_p'),
    (dict(sampling=dict(top_k=-2)), 'sampling.top_k'),
    (dict(sampling=dict(temperature=1e6)), 'sampling.temperature'),
    (dict(sampling=dict(logit_bias={5: 300.0})), 'sampling.logit_bias[5]'),
    (dict(sampling=dict(min_p=2.0)), 'sampling.min_p'),
    (dict(sampling=dict(repetition_penalty=0.0)), 'sampling.repetition_penalty'),
    (dict(sampling=dict(presence_penalty=3.0)), 'sampling.presence_penalty'),
    (dict(sampling=dict(logit_bias={100000: 1.0})), 'sampling.logit_bias'),
    (dict(token_ids=[1, 2, 100000]), 'token_ids[2]'),
    (dict(token_ids=[]), 'prompt'),
    (dict(token_ids=[1], text='hi'), 'prompt'),
    (dict(token_ids=[1, 2, 3], max_tokens=MAX_SEQ_LEN - 2), 'max_tokens'),
    (dict(token_ids=[1] * MAX_SEQ_LEN), 'prompt'),
    (dict(max_tokens=-1), 'max_tokens'),
    (dict(top_logprobs=99), 'top_logprobs'),
    (dict(stop=['']), 'stop[0]'),
    (dict(stop_token_ids=[-5]), 'stop_token_ids[0]'),
]


@pytest.mark.parametrize('fields,field', BAD, ids=[f for _, f in BAD])
def test_invalid_requests_name_the_field(served, fields, field):
    fields = dict(fields)
    prompt = fields.pop('token_ids', [1, 2, 3])
    msg = pb.GenerateRequest(token_ids=prompt, max_tokens=fields.pop('max_tokens', 4),
                             sampling=pb.SamplingParams(**fields.pop('sampling', {})), **fields)
    with pytest.raises(grpc.RpcError) as e:
        run(served.stub, msg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ':'), e.value.details()


@pytest.fixture
def submitted(served, monkeypatch) -> list:
    """The orchestrator's Request objects, as the server submits them."""
    orch, requests = served.server.orchestrator, []
    original = orch.submit

    def record(req):
        original(req)
        requests.append(req)

    monkeypatch.setattr(orch, 'submit', record)
    return requests


def test_cancel_frees_the_slot(served, submitted):
    p = prompts(1, seed=8)[0]
    long = request(p, MAX_SEQ_LEN - len(p), ignore_eos=True)
    stream = served.stub.Generate(long, timeout=RPC_TIMEOUT)
    next(stream), next(stream)
    assert served.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT).busy_slots == 1
    stream.cancel()
    info = wait_idle(served.stub, timeout=10)
    assert (info.busy_slots, info.free_slots, info.queued) == (0, MAX_BATCH, 0)
    # It ended early, as cancelled, not by running to max_tokens.
    assert [r.finish_reason for r in submitted] == ['cancelled']
    assert all(r.completion_tokens < long.max_tokens for r in submitted)


def _threads() -> tuple[set[str], int]:
    names = [t.name for t in threading.enumerate()]
    workers = [n for n in names if n.startswith('glmjax-grpc')]
    return {n for n in names if not n.startswith('glmjax-grpc')}, len(workers)


def test_200_requests_with_random_cancellations_leave_nothing_behind(served, submitted):
    rng = random.Random(9)
    plan = [(p, rng.choice(['finish', 'cancel', 'deadline']), rng.randrange(0, 4))
            for p in prompts(200, seed=9)]
    before, _ = _threads()

    def one(item):
        p, how, after = item
        req = request(p, rng.randrange(4, 40), ignore_eos=True,
                      sampling=dict(temperature=1.0, seed=len(p)))
        if how == 'deadline':
            try:
                run(served.stub, req, timeout=0.02 + after * 0.05)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return
        stream = served.stub.Generate(req, timeout=RPC_TIMEOUT)
        for i, _ in enumerate(stream):
            if how == 'cancel' and i >= after:
                stream.cancel()
                break

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, plan))
    info = wait_idle(served.stub, timeout=20)
    assert time.monotonic() - start < 120
    assert (info.busy_slots, info.free_slots, info.queued) == (0, MAX_BATCH, 0)
    orch = served.server.orchestrator
    assert not orch._pending and all(s is None for s in orch._slots)
    end = time.monotonic() + 10
    while orch._detok_queue.qsize() and time.monotonic() < end:
        time.sleep(0.05)
    assert orch._detok_queue.qsize() == 0
    after, workers = _threads()
    assert after == before  # no thread of ours left behind (gRPC's pool threads are reused)
    assert workers <= MAX_BATCH + 64 + 8
    reasons = collections.Counter(r.finish_reason for r in submitted)
    # A few tiny deadlines may expire before the server even sees the call.
    assert len(submitted) > 180 and set(reasons) == {'cancelled', 'length'}, reasons
    assert reasons['cancelled'] > 50


@pytest.fixture(scope='module')
def guarded(model):
    """A second server: bearer-token auth, a queue of 1 and a slow device."""
    server = make_server(model, SlowEngine, max_queue=1, api_key='sesame')
    channel = grpc.insecure_channel(f'127.0.0.1:{server.port}')
    yield types.SimpleNamespace(server=server, channel=channel, stub=pb_grpc.GlmStub(channel))
    channel.close()
    server.shutdown(grace=5)


KEY = [('authorization', 'Bearer sesame')]


def test_a_deadline_frees_the_slot(guarded):
    # The slow device takes 0.1 s per call of 4 tokens: the whole request would take 3 s.
    long = request([5, 6, 7], MAX_SEQ_LEN - 3, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as e:
        run(guarded.stub, long, timeout=0.5, metadata=KEY)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = wait_idle(guarded.stub, timeout=10, metadata=KEY)
    assert (info.busy_slots, info.free_slots, info.queued) == (0, MAX_BATCH, 0)


def test_wrong_or_missing_key_is_unauthenticated(guarded):
    for metadata in (None, [('authorization', 'Bearer nope')], [('authorization', 'sesame')]):
        for call in (lambda m: run(guarded.stub, request([1, 2, 3], 2), metadata=m),
                     lambda m: guarded.stub.GetModelInfo(pb.ModelInfoRequest(), metadata=m,
                                                         timeout=RPC_TIMEOUT)):
            with pytest.raises(grpc.RpcError) as e:
                call(metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ids, _, _ = run(guarded.stub, request([1, 2, 3], 2, ignore_eos=True), metadata=KEY)
    assert len(ids) == 2
    health = health_pb2_grpc.HealthStub(guarded.channel)  # load balancers need no key
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_full_queue_is_resource_exhausted_at_once(guarded, model):
    stub = guarded.stub
    long = request([5, 6, 7], MAX_SEQ_LEN - 3, ignore_eos=True)
    streams = []
    try:
        for _ in range(MAX_BATCH):
            streams.append(stub.Generate(long, timeout=RPC_TIMEOUT, metadata=KEY))
            next(streams[-1])  # running in a slot
        guarded.server.engine.running.clear()  # and there they stay until the end
        streams.append(stub.Generate(long, timeout=RPC_TIMEOUT, metadata=KEY))
        end = time.monotonic() + 10
        while stub.GetModelInfo(pb.ModelInfoRequest(), metadata=KEY,
                                timeout=RPC_TIMEOUT).queued < 1:
            assert time.monotonic() < end, 'the fifth request never queued'
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            run(stub, long, metadata=KEY)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 'queue' in e.value.details()
        assert time.monotonic() - start < 2.0
        # The HTTP front shares the queue: 429 in OpenAI form, streaming or not.
        import httpx

        from glmjax.serving.server import start_http
        front = start_http(guarded.server, 'sesame', '127.0.0.1', 0)
        try:
            for stream in (False, True):
                r = httpx.post(f'http://127.0.0.1:{front.port}/v1/completions',
                               json={'prompt': [5, 6, 7], 'max_tokens': 4, 'stream': stream},
                               headers={'Authorization': 'Bearer sesame'}, timeout=RPC_TIMEOUT)
                assert r.status_code == 429 and 'queue' in r.json()['error']['message']
        finally:
            front.stop()
    finally:
        guarded.server.engine.running.set()
        for s in streams:
            s.cancel()
    info = wait_idle(stub, timeout=10, metadata=KEY)
    assert (info.busy_slots, info.free_slots, info.queued) == (0, MAX_BATCH, 0)


# ---- the HTTP API over the same engine --------------------------------------------------

@pytest.fixture(scope='module')
def http(served):
    from glmjax.serving.server import start_http
    front = start_http(served.server, None, '127.0.0.1', 0)
    yield front
    front.stop()


def test_http_chat_is_the_engine_greedy_parsed(served, http):
    import openai

    from glmjax.serving.chat import DEFAULT_TEMPLATE, ChatTemplate
    from glmjax.serving.glm_parser import parse
    client = openai.OpenAI(base_url=f'http://127.0.0.1:{http.port}/v1', api_key='x',
                           max_retries=0, timeout=RPC_TIMEOUT)
    messages = [{'role': 'user', 'content': 'def fibonacci(n):'}]
    r = client.chat.completions.create(model='test-tiny', messages=messages, temperature=0,
                                       max_tokens=24)
    with open(DEFAULT_TEMPLATE) as f:
        prompt = served.tok.encode(ChatTemplate(f.read()).render(messages))
    ids = generate(served.cfg, served.params, [prompt], 24)[0]
    expected = parse(served.tok.decode(ids[:-1] if ids[-1] in served.cfg.eos_token_ids
                                       else ids))
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(ids)
    assert (r.choices[0].message.content or '') == expected.content
    streamed = ''.join(c.choices[0].delta.content or '' for c in client.chat.completions.create(
        model='test-tiny', messages=messages, temperature=0, max_tokens=24, stream=True)
        if c.choices)
    assert streamed == (r.choices[0].message.content or '')


def test_http_completions_and_embeddings(served, http):
    import httpx
    url = f'http://127.0.0.1:{http.port}'
    p = prompts(1, seed=21)[0]
    r = httpx.post(url + '/v1/completions', json={'prompt': p, 'max_tokens': 8,
                                                 'temperature': 0, 'ignore_eos': True},
                   timeout=RPC_TIMEOUT).json()
    ids = generate(served.cfg, served.params, [p], 8, stop_ids=())[0]
    assert r['choices'][0]['text'] == served.tok.decode(ids)
    e = httpx.post(url + '/v1/embeddings', json={'input': ['hello', 'world']},
                   timeout=RPC_TIMEOUT).json()
    vectors = np.array([d['embedding'] for d in e['data']])
    assert vectors.shape == (2, served.cfg.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    assert httpx.get(url + '/health').status_code == 200
    info = served.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT)
    assert info.busy_slots == 0  # the HTTP requests used, then freed, the same slots


def test_http_client_leaving_a_stream_frees_its_slot(served, http):
    import httpx
    p = prompts(1, seed=22)[0]
    body = {'prompt': p, 'max_tokens': MAX_SEQ_LEN - len(p), 'ignore_eos': True,
            'stream': True, 'temperature': 0}
    with httpx.stream('POST', f'http://127.0.0.1:{http.port}/v1/completions', json=body,
                      timeout=RPC_TIMEOUT) as r:
        lines = r.iter_lines()
        assert next(lines).startswith('data: ')
        busy = served.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT).busy_slots
        assert busy == 1
    info = wait_idle(served.stub, timeout=10)
    assert (info.busy_slots, info.queued) == (0, 0)
    metrics = httpx.get(f'http://127.0.0.1:{http.port}/metrics').text
    assert 'glmjax:request_queue_time_seconds_count' in metrics


def test_a_seed_means_the_same_in_generate_and_the_server(served):
    """One sampler: the server with a seed samples what `generate` samples with it."""
    for i, p in enumerate(prompts(3, seed=31)):
        settings = dict(temperature=1.0, top_k=50, min_p=0.01)
        ids, _, _ = run(served.stub, request(p, 12, ignore_eos=True,
                                             sampling=dict(**settings, seed=100 + i)))
        assert ids == generate(served.cfg, served.params, [p], 12, seed=100 + i,
                               stop_ids=(), **settings)[0]
        other = generate(served.cfg, served.params, [p], 12, seed=200 + i, stop_ids=(),
                         **settings)[0]
        assert ids != other  # the seed matters
