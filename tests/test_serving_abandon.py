"""Abandoned work, hostile neighbours and honest statuses, end to end over the real engine
(the embedded default model) behind gRPC and HTTP."""

import concurrent.futures
import threading
import time
import types

import grpc
import httpx
import pytest

from glmjax import generate
from glmjax.serving.engine import SlotSettings
from glmjax.serving.orchestrator import Request
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.server import start_http
from glmjax.serving.service import GlmServer

MAX_BATCH, MAX_SEQ_LEN, STEPS = 4, 128, 4
RPC_TIMEOUT = 60
STEP_S = 0.05  # a slow device: 100 tokens take 100 / STEPS * STEP_S = 1.25 s or more


class SlowEngine(PagedEngine):
    """STEP_S per call; clearing `running` holds every call until it is set again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running = threading.Event()
        self.running.set()

    def generate(self, masks=None):
        self.running.wait()
        time.sleep(STEP_S)
        return super().generate(masks)


@pytest.fixture(scope='module')
def served(model):
    cfg, params, tok = model
    eng = SlowEngine(cfg, params, MAX_BATCH, MAX_SEQ_LEN, STEPS)
    server = GlmServer(eng, tok, cfg, 'test-tiny', 2).start()
    server.warmup()
    channel = grpc.insecure_channel(f'127.0.0.1:{server.port}')
    front = start_http(server, None, '127.0.0.1', 0)
    yield types.SimpleNamespace(cfg=cfg, params=params, tok=tok, server=server,
                                stub=pb_grpc.GlmStub(channel),
                                url=f'http://127.0.0.1:{front.port}')
    front.stop()
    channel.close()
    server.shutdown(grace=5)


def stats(served) -> dict:
    return served.server.orchestrator.stats()


def idle_within(served, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = stats(served)
        if s['busy_slots'] == 0 and s['queued'] == 0:
            return True
        time.sleep(0.01)
    return False


def long_request(prompt=(5, 6, 7), **fields):
    return pb.GenerateRequest(token_ids=list(prompt), max_tokens=MAX_SEQ_LEN - len(prompt),
                              ignore_eos=True, **fields)


def test_100_expired_deadlines_are_all_deadline_exceeded(served):
    def one(i):
        try:
            for _ in served.stub.Generate(long_request(), timeout=0.05 + 0.01 * (i % 10)):
                pass
        except grpc.RpcError as e:
            return e.code()
        return None

    with concurrent.futures.ThreadPoolExecutor(MAX_BATCH + 2) as pool:  # what fits
        codes = list(pool.map(one, range(100)))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 100
    assert idle_within(served, 5)


def test_expired_requests_leave_the_queue_at_once(served):
    streams = [served.stub.Generate(long_request(), timeout=RPC_TIMEOUT)
               for _ in range(MAX_BATCH)]
    try:
        for s in streams:
            next(s)  # every slot busy for about 1.5 s
        queued = [served.stub.Generate(long_request(), timeout=0.2) for _ in range(2)]
        time.sleep(0.4)  # both deadlines passed; the slots are still busy
        assert stats(served)['busy_slots'] == MAX_BATCH
        assert stats(served)['queued'] == 0
        for q in queued:
            with pytest.raises(grpc.RpcError) as e:
                list(q)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The queue (max_queue 2) has room again although no slot freed.
        more = [served.stub.Generate(long_request(), timeout=RPC_TIMEOUT) for _ in range(2)]
        end = time.monotonic() + 5
        while stats(served)['queued'] < 2:
            assert time.monotonic() < end
            time.sleep(0.01)
        for m in more:
            m.cancel()
    finally:
        for s in streams:
            s.cancel()
    assert idle_within(served, 5)


def test_a_failing_request_fails_alone(served):
    """A request whose settings cannot reach the device (here built past the validator)
    fails by itself; the stream beside it goes on and gives the same tokens as alone."""
    prompt = [9, 8, 7, 6]
    beside = served.stub.Generate(pb.GenerateRequest(
        token_ids=prompt, max_tokens=24, ignore_eos=True,
        sampling=pb.SamplingParams(temperature=0.0)), timeout=RPC_TIMEOUT)
    first = next(beside)
    bad = Request([1, 2, 3], SlotSettings(max_new=4, top_k=2 ** 40), served.tok)
    served.server.orchestrator.submit(bad)
    chunk = bad.out.get(timeout=RPC_TIMEOUT)
    assert chunk.finish_reason == 'error' and bad.id in chunk.stop_reason
    ids = list(first.token_ids) + [t for r in beside for t in r.token_ids]
    assert ids == generate(served.cfg, served.params, [prompt], 24, stop_ids=())[0]


def test_hostile_http_request_beside_a_stream(served):
    prompt = [4, 4, 4, 4, 4]
    beside = served.stub.Generate(pb.GenerateRequest(
        token_ids=prompt, max_tokens=24, ignore_eos=True,
        sampling=pb.SamplingParams(temperature=0.0)), timeout=RPC_TIMEOUT)
    first = next(beside)
    for body in ({'prompt': [1, 2], 'top_k': 2 ** 70}, {'prompt': [1, 2], 'seed': -2 ** 70},
                 {'prompt': [1, 2], 'max_tokens': 2 ** 62},
                 {'prompt': [1, 2], 'logit_bias': {'3': float('1e308')}}):
        r = httpx.post(served.url + '/v1/completions', json=body, timeout=RPC_TIMEOUT)
        assert r.status_code == 400, (body, r.text)
    ids = list(first.token_ids) + [t for r in beside for t in r.token_ids]
    assert ids == generate(served.cfg, served.params, [prompt], 24, stop_ids=())[0]
    assert httpx.get(served.url + '/health', timeout=10).status_code == 200


def test_n_is_admitted_all_or_nothing(served):
    body = {'prompt': [1, 2, 3], 'max_tokens': 4, 'n': MAX_BATCH + 3}  # more than fits
    r = httpx.post(served.url + '/v1/completions', json=body, timeout=RPC_TIMEOUT)
    assert r.status_code == 429 and r.headers['retry-after']
    assert stats(served) == {'busy_slots': 0, 'free_slots': MAX_BATCH, 'queued': 0}


def test_dropped_n_stream_frees_every_choice(served):
    body = {'prompt': [1, 2, 3], 'max_tokens': 100, 'ignore_eos': True, 'n': MAX_BATCH + 2,
            'stream': True}
    assert idle_within(served, 10)
    with httpx.stream('POST', served.url + '/v1/completions', json=body,
                      timeout=RPC_TIMEOUT) as r:
        assert next(r.iter_lines()).startswith('data: ')
        # Every choice is running or waiting (a request being admitted is briefly in
        # neither count: wait for the counts to settle), with the device held meanwhile so
        # that no choice can finish first, however slow the machine.
        served.server.engine.running.clear()
        try:
            end = time.monotonic() + 10
            while stats(served) != {'busy_slots': MAX_BATCH, 'free_slots': 0, 'queued': 2}:
                assert time.monotonic() < end, stats(served)
                time.sleep(0.01)
        finally:
            served.server.engine.running.set()
        dropped = time.monotonic()
    assert idle_within(served, 1.0), stats(served)
    assert time.monotonic() - dropped < 1.0  # generating it all would take seconds


def test_non_streaming_client_that_leaves_frees_its_work(served):
    body = {'prompt': [1, 2, 3], 'max_tokens': 100, 'ignore_eos': True, 'n': 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + '/v1/completions', json=body, timeout=0.3)
    assert idle_within(served, 1.0), stats(served)


def test_shutdown_cut_stream_ends_with_an_error_event(model):
    cfg, params, tok = model
    server = GlmServer(SlowEngine(cfg, params, MAX_BATCH, MAX_SEQ_LEN, STEPS), tok, cfg,
                       'test-tiny', 2).start()
    server.warmup()
    front = start_http(server, None, '127.0.0.1', 0)
    url = f'http://127.0.0.1:{front.port}'
    channel = grpc.insecure_channel(f'127.0.0.1:{server.port}')
    stub = pb_grpc.GlmStub(channel)
    lines, code, health = [], [], []
    try:
        def http_stream():
            body = {'prompt': [1, 2, 3], 'max_tokens': 120, 'ignore_eos': True, 'stream': True}
            with httpx.stream('POST', url + '/v1/completions', json=body,
                              timeout=RPC_TIMEOUT) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)

        def grpc_stream():
            try:
                for _ in stub.Generate(long_request(), timeout=RPC_TIMEOUT):
                    pass
            except grpc.RpcError as e:
                code.append(e.code())

        threads = [threading.Thread(target=http_stream), threading.Thread(target=grpc_stream)]
        for t in threads:
            t.start()
        end = time.monotonic() + 10
        while server.orchestrator.stats()['busy_slots'] < 2:
            assert time.monotonic() < end
            time.sleep(0.01)
        stopper = threading.Thread(target=server.shutdown, args=(0.3,))
        stopper.start()
        time.sleep(0.1)
        r = httpx.get(url + '/health', timeout=10)
        health.append((r.status_code, r.json()['error']['code']))
        stopper.join(30)
        for t in threads:
            t.join(30)
    finally:
        front.stop()
        channel.close()
    assert health == [(503, 'draining')]
    assert code == [grpc.StatusCode.UNAVAILABLE]
    assert lines[-1] == 'data: [DONE]'
    assert '"code": "shutdown"' in lines[-2], lines[-3:]
    assert all('"finish_reason": "length"' not in x and '"finish_reason": "stop"' not in x
               for x in lines)
