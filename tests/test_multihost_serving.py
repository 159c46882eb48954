"""glmjax-serve over two processes (4 CPU devices each, one 8-device mesh): process 0 serves
and decides every step, process 1 follows. Decoding with MTP speculation, they answer
greedily like a single-process server without it (speculation is exact), and
when the follower dies the leader turns NOT_SERVING, ends every stream UNAVAILABLE, and both
processes exit non-zero."""

import concurrent.futures
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glmjax.serving.lockstep import EXIT_PEER_LOST
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.server import load_model
from glmjax.serving.service import GlmServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BATCH, MAX_SEQ_LEN, STEPS = 4, 128, 4
TIMEOUT = 120  # seconds: every wait is bounded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (value := predicate()) is not None:
            return value
        time.sleep(0.2)
    raise AssertionError(f'timed out waiting for {what}')


def health(channel) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return None


class Pair:
    """Two glmjax-serve processes on this machine, as launch/local.sh starts them."""

    def __init__(self, tmp_path, extra=()):
        self.logs = [tmp_path / f'process{i}.log' for i in range(2)]
        coordinator, lockstep = free_port(), free_port()
        env = dict(os.environ, GLMJAX_CACHE=str(tmp_path / 'cache'), PYTHONPATH=ROOT,
                   JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4')
        self.procs = []
        for i in range(2):
            cmd = [sys.executable, '-m', 'glmjax.serving.server',
                   f'--coordinator_address=127.0.0.1:{coordinator}', '--num_processes=2',
                   f'--process_id={i}', f'--lockstep_port={lockstep}',
                   '--mesh=expert=4,tensor=2', '--grpc_host=127.0.0.1', '--grpc_port=0',
                   '--http_host=127.0.0.1', '--http_port=0', f'--max_batch={MAX_BATCH}',
                   f'--max_seq_len={MAX_SEQ_LEN}', f'--decode_steps={STEPS}', '--max_queue=32',
                   '--peer_timeout_s=20', *extra]
            with open(self.logs[i], 'w') as log:
                self.procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log,
                                                   stderr=subprocess.STDOUT))
        try:
            port = wait_for(self._port, TIMEOUT, 'process 0 to listen')
            self.channel = grpc.insecure_channel(f'127.0.0.1:{port}')
            wait_for(lambda: True if health(self.channel) == health_pb2.HealthCheckResponse.SERVING
                     else None, 6 * TIMEOUT, 'health SERVING')  # warm-up measures too
        except BaseException:
            self.stop()
            raise
        self.stub = pb_grpc.GlmStub(self.channel)
        self.http = 'http://127.0.0.1:' + re.search(r'HTTP API on http://[\d.]+:(\d+)',
                                                    self.log(0)).group(1)

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def _port(self) -> int | None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                raise AssertionError(f'process {i} exited with {p.returncode}:\n'
                                     f'{self.log(i)[-3000:]}')
        m = re.search(r'listening on [\d.]+:(\d+)', self.log(0))
        return int(m.group(1)) if m else None

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    pair = Pair(tmp_path_factory.mktemp('pair'), ['--speculative=mtp',
                                                   '--num_speculative_tokens=2'])
    yield pair
    pair.stop()


def greedy(prompt, max_tokens) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=prompt, max_tokens=max_tokens,
                              sampling=pb.SamplingParams(temperature=0.0))


def tokens(stub, req) -> list[int]:
    return [t for r in stub.Generate(req, timeout=TIMEOUT) for t in r.token_ids]


def test_two_processes_serve_like_one(pair):
    """Page tables are decided by the same host calls in every process, so the followers
    stay in lockstep; prefix caching included (half the prompts share 40 tokens)."""
    rng = random.Random(0)
    system = [rng.randrange(700) for _ in range(40)]
    reqs = [greedy(system * (i % 2) + [rng.randrange(700) for _ in range(rng.randrange(1, 60))],
                   rng.randrange(4, 40)) for i in range(16)]
    # Constrained and sampled: the followers get each step's masks after its forward.
    reqs += [pb.GenerateRequest(text='code:', max_tokens=20, regex='[a-c]{2,6}-[0-9]{1,3}',
                                sampling=pb.SamplingParams(temperature=1.0, seed=seed))
             for seed in range(3)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: tokens(pair.stub, r), reqs))

    # The same requests on a single-process server over one device, plain, with the
    # smallest token budget (its warm-up compiles one mixed step): neither changes a token.
    cfg, params, tok, _ = load_model()  # glmjax-serve's embedded default, as the pair's
    single = GlmServer(PagedEngine(cfg, params, MAX_BATCH, MAX_SEQ_LEN, STEPS,
                                   max_num_batched_tokens=16), tok, cfg,
                       'single', 32).start()
    try:
        single.warmup()
        with grpc.insecure_channel(f'127.0.0.1:{single.port}') as channel:
            stub = pb_grpc.GlmStub(channel)
            alone = [tokens(stub, r) for r in reqs]
    finally:
        single.shutdown(grace=5)
    assert together == alone
    assert len({tuple(t) for t in alone}) == len(reqs)
    texts = [tok.decode([i for i in t if i not in cfg.eos_token_ids]) for t in alone[16:]]
    assert all(re.fullmatch('[a-c]{2,6}-[0-9]{1,3}', t) for t in texts), texts

    def all_free():
        info = pair.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        return info if info.free_slots == MAX_BATCH else None

    info = wait_for(all_free, 30, 'all slots free')
    assert info.busy_slots == 0 and info.queued == 0
    assert 'process 1 follows process 0' in pair.log(1)
    # The token budget was measured in lockstep (each step timed on both processes, the
    # slower kept): the pair agreed, or the steps since would have diverged.
    assert re.search(r'--max_num_batched_tokens \d+, measured: a decode call of '
                     rf'{MAX_BATCH} sequences', pair.log(0))
    import httpx
    metrics = httpx.get(pair.http + '/metrics', timeout=TIMEOUT).text
    drafts = re.search(r'^glmjax:spec_decode_num_draft_tokens (\S+)$', metrics, re.M)
    assert drafts and float(drafts.group(1)) > 0  # the first decode calls speculated
    # Speculation's cost was measured in lockstep too (else the calls would have diverged).
    assert re.search(r'--speculative_max_batch measured: .* by sequences: 1 \d', pair.log(0))


def test_embeddings_across_two_processes_equal_one_device(pair):
    import httpx
    import numpy as np
    rng = random.Random(1)
    inputs = [[rng.randrange(700) for _ in range(n)] for n in (3, 17, 40)]
    r = httpx.post(pair.http + '/v1/embeddings', json={'input': inputs}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    together = np.array([d['embedding'] for d in r.json()['data']])
    cfg, params, _, _ = load_model()
    alone = PagedEngine(cfg, params, MAX_BATCH, MAX_SEQ_LEN, STEPS).embed(inputs)
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_a_dead_follower_stops_both_processes(pair):
    """Runs last: it ends the pair."""
    long = pb.GenerateRequest(token_ids=[1, 2, 3], max_tokens=120, ignore_eos=True,
                              sampling=pb.SamplingParams(temperature=0.0))
    streams = [pair.stub.Generate(long, timeout=TIMEOUT) for _ in range(3)]
    first = next(streams[0])  # streaming has begun
    assert len(first.token_ids) > 0
    killed = time.monotonic()
    pair.procs[1].send_signal(signal.SIGKILL)
    for stream in streams:  # none hangs: each ends UNAVAILABLE, naming the lost process
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 'process 1' in e.value.details()
    assert health(pair.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        tokens(pair.stub, greedy([1, 2], 4))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    codes = [p.wait(timeout=60 - (time.monotonic() - killed)) for p in pair.procs]
    assert codes == [EXIT_PEER_LOST, -signal.SIGKILL]
    assert time.monotonic() - killed < 60
    assert 'process 1 closed its connection' in pair.log(0)
