"""glmjax-serve as a real process: flags, TLS, bearer auth, the client CLI, and SIGTERM
draining (stop admission, finish in-flight requests, exit 0)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glmjax.serving.protos import pb, pb_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = 'k3y'
AUTH = [('authorization', f'Bearer {KEY}')]


def self_signed(tmp_path) -> tuple[str, str]:
    cert, key = str(tmp_path / 'cert.pem'), str(tmp_path / 'key.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key,
                    '-out', cert, '-days', '1', '-subj', '/CN=localhost',
                    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def read_port(proc: subprocess.Popen, timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if 'listening on' in line:
            return int(line.split('(')[0].strip().rsplit(':', 1)[1])
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f'the server did not start (exit code {proc.poll()})')


def wait_serving(channel, timeout: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError('health never turned SERVING')


@pytest.mark.skipif(shutil.which('openssl') is None, reason='needs openssl for a test cert')
def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    cert, key = self_signed(tmp_path)
    env = dict(os.environ, GLMJAX_CACHE=str(tmp_path / 'cache'), PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'glmjax.serving.server', '--grpc_host=127.0.0.1', '--grpc_port=0',
           '--max_batch=2', '--max_seq_len=128', '--max_queue=4', '--decode_steps=1',
           '--drain_grace_s=60', f'--api_key={KEY}', f'--tls_cert={cert}', f'--tls_key={key}']
    errors = open(tmp_path / 'stderr.log', 'w')
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=errors, text=True)
    try:
        port = read_port(proc, timeout=120)
        with open(cert, 'rb') as f:
            creds = grpc.ssl_channel_credentials(f.read())
        channel = grpc.secure_channel(f'127.0.0.1:{port}', creds)
        wait_serving(channel, timeout=240)
        stub = pb_grpc.GlmStub(channel)

        # The client CLI, over TLS with the key.
        out = subprocess.run(
            [sys.executable, '-m', 'glmjax.serving.client', f'--target=127.0.0.1:{port}',
             f'--tls_ca={cert}', f'--api_key={KEY}', '--token_ids=1,2,3', '--max_tokens=5',
             '--temperature=0', '--ignore_eos', '--json'],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        assert sum(len(x.get('tokenIds', [])) for x in lines) == 5
        assert lines[-1]['finishReason'] == 'LENGTH'

        # One long request in flight, then SIGTERM.
        req = pb.GenerateRequest(token_ids=[1, 2, 3], max_tokens=120, ignore_eos=True,
                                 sampling=pb.SamplingParams(temperature=0.0))
        stream = stub.Generate(req, timeout=120, metadata=AUTH)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        probe = pb.GenerateRequest(token_ids=[1], max_tokens=1)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(probe, timeout=30, metadata=AUTH))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 'shutting down' in e.value.details()
        rest = list(stream)  # the in-flight request still runs to its end
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 120
        assert rest[-1].finish_reason == pb.LENGTH
        assert proc.wait(timeout=60) == 0
        channel.close()
        # Start-up says what it does in one progress line, not in absl's INFO lines.
        log = (tmp_path / 'stderr.log').read_text()
        assert re.search(r'compiling \[#+\] (\d+)/\1 ', log), log[-2000:]
        assert len([x for x in log.splitlines() if x.startswith('I1')]) == 0, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        errors.close()
