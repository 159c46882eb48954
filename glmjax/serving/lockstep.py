"""Multi-host serving: every process holds shards of the model, so every process must make
the same jitted calls, with the same arguments, in the same order.

    process 0 (leader)                                    process i > 0 (follower)
    gRPC + HTTP -> Orchestrator                           follow(engine, ...)
                     | engine calls                            ^
                     v                                         |
                  LeaderEngine --- one line of JSON per call --+ (TCP, leader listens)
                     |  then the same call on its own PagedEngine    the same call
                     v                                               v
                  jitted call  <======== collectives over the mesh ========>  jitted call

The leader alone decides each step (admissions, slots, sampling settings, frees); a decision
reaches every follower before the leader makes the call itself. Outputs are replicated, so
the leader reads them from its own devices and the followers drop theirs.

Both sides send a heartbeat every `interval` seconds and read the other side on a thread of
its own, so a process that dies (its connection closes) or hangs (its heartbeats stop for
`timeout` seconds) is noticed even while the device loop is stuck in a collective that waits
for it. The leader then reports the failure (`on_failure`; glmjax-serve turns health
NOT_SERVING and answers in-flight requests UNAVAILABLE) and the followers exit non-zero.

An engine call that raises on the leader (the orchestrator then fails the requests concerned
and serves on, as on one host) is announced to the followers with a `failed` message: the
engine is deterministic, so their same call failed too, and they go on in step. A call that
fails on one side only leaves the processes with different states: the follower stops
(`Diverged`, naming the call and the error), and the leader sees it gone.
"""

import base64
import json
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable

import numpy as np

from glmjax.serving.engine import Engine, EngineLost, Prefix, SlotSettings, StepOutput

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 3  # a process exits with this when another process of the mesh is gone
HEARTBEAT_S = 1.0
# After a failed device call: how long to wait for the watch threads to name a lost peer.
LOST_WAIT_S = 5.0


def _send(sock: socket.socket, lock: threading.Lock, message: dict) -> None:
    data = (json.dumps(message, separators=(',', ':')) + '\n').encode()
    with lock:
        sock.sendall(data)


class _Reader:
    """One peer's messages, a line of JSON each."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer, self.lines = sock, b'', []

    def next(self, timeout: float) -> dict | None:
        """The next message; None when the peer closed the connection. TimeoutError when
        nothing, not even a heartbeat, came for `timeout` seconds."""
        self.sock.settimeout(timeout)
        while not self.lines:
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            *lines, self.buffer = (self.buffer + data).split(b'\n')
            self.lines += lines
        return json.loads(self.lines.pop(0))


class Leader:
    """Process 0's side. Listens at once; start() waits for every follower, then the leader
    broadcasts calls and watches the followers."""

    def __init__(self, port: int, followers: int, timeout: float,
                 interval: float = HEARTBEAT_S):
        self.port, self.followers = port, followers
        self.timeout, self.interval = timeout, interval
        self.on_failure = None
        self.failed = threading.Event()
        self.failure = ''
        self._lock = threading.Lock()  # one writer at a time on the sockets
        self._closing = False
        self.peers: dict[int, socket.socket] = {}
        self._readers: dict[int, _Reader] = {}
        try:
            self._server = socket.create_server(('', port))
        except OSError as e:
            raise EngineLost(f'cannot listen on lockstep port {port}: {e}') from None

    def start(self, on_failure, connect_timeout: float = 600.0) -> None:
        """Waits for every follower to connect (EngineLost if one does not in time), then
        watches them: on_failure(message) is called once, from another thread, when one is
        lost."""
        self.on_failure = on_failure
        self._server.settimeout(connect_timeout)
        try:
            while len(self.peers) < self.followers:
                try:
                    sock, address = self._server.accept()
                except TimeoutError:
                    missing = sorted(set(range(1, self.followers + 1)) - set(self.peers))
                    raise EngineLost(f'processes {missing} did not connect to lockstep port '
                                     f'{self.port} within {connect_timeout:.0f} s') from None
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reader = _Reader(sock)
                hello = reader.next(connect_timeout) or {}
                if 'process' not in hello:
                    raise EngineLost(f'a connection from {address[0]} to lockstep port '
                                     f'{self.port} did not say which process it is')
                self.peers[hello['process']] = sock
                self._readers[hello['process']] = reader
                log.info('process %d connected from %s', hello['process'], address[0])
        finally:
            self._server.close()
        for process, reader in self._readers.items():
            threading.Thread(target=self._watch, args=(process, reader), daemon=True,
                             name=f'glmjax-watch-{process}').start()
        threading.Thread(target=self._heartbeat, daemon=True, name='glmjax-heartbeat').start()

    def _fail(self, message: str) -> None:
        if self._closing or self.failed.is_set():
            return
        self.failure = message
        self.failed.set()
        log.error('%s', message)
        self.on_failure(message)

    def _watch(self, process: int, reader: _Reader) -> None:
        try:
            while reader.next(self.timeout) is not None:
                pass
            self._fail(f'process {process} closed its connection (it exited or crashed)')
        except ConnectionError:  # reset rather than closed: gone all the same
            self._fail(f'process {process} closed its connection (it exited or crashed)')
        except TimeoutError:
            self._fail(f'process {process} sent nothing for {self.timeout:.0f} s (hung)')
        except (OSError, ValueError) as e:
            self._fail(f'process {process}: connection failed: {e}')

    def _heartbeat(self) -> None:
        while not self.failed.wait(self.interval) and not self._closing:
            try:
                self.broadcast({'op': 'ping'})
            except EngineLost:
                return

    def broadcast(self, message: dict) -> None:
        if self.failed.is_set():
            raise EngineLost(self.failure)
        for process, sock in self.peers.items():
            try:
                _send(sock, self._lock, message)
            except OSError as e:
                self._fail(f'process {process}: cannot send: {e}')
                raise EngineLost(self.failure) from None

    def close(self) -> None:
        """An orderly stop: the followers exit 0."""
        if self.failed.is_set():
            return
        self._closing = True  # followers closing their connections now is no failure
        try:
            self.broadcast({'op': 'stop'})
        except EngineLost:
            return
        for sock in self.peers.values():
            sock.close()


class LeaderEngine(Engine):
    """The leader's engine: each call goes to the followers first, then runs here."""

    def __init__(self, engine: Engine, leader: Leader):
        self.engine, self.leader = engine, leader
        self.max_batch, self.max_seq_len = engine.max_batch, engine.max_seq_len
        self.vocab_size, self.steps_per_call = engine.vocab_size, engine.steps_per_call

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.engine.buckets

    @property
    def capacity(self) -> int:
        return self.engine.capacity

    def can_admit(self, prompt: list[int], max_new: int) -> bool:
        # Host bookkeeping only: every follower reaches the same state from the same calls.
        return self.engine.can_admit(prompt, max_new)

    def cached_tokens(self, slot: int) -> int:
        return self.engine.cached_tokens(slot)

    def metrics(self) -> dict:
        # The leader's own bookkeeping (pages, prefix cache, drafts): no device call.
        return self.engine.metrics()

    def lost(self) -> str | None:
        # A collective that lost its peer may fail before the watch threads notice: wait.
        return self.leader.failure if self.leader.failed.wait(LOST_WAIT_S) else None

    def _call(self, message: dict, run):
        self.leader.broadcast(message)
        try:
            return run()
        except Exception as e:
            # Say so when a peer is gone, rather than report an engine bug (warm-up is not
            # run by the orchestrator, which asks lost() itself).
            if (failure := self.lost()) is not None:
                raise EngineLost(failure) from e
            # The orchestrator fails the requests concerned and goes on; the followers, whose
            # same call failed as well (the engine is deterministic), go on with it.
            self.leader.broadcast({'op': 'failed', 'call': message['op'],
                                   'error': f'{type(e).__name__}: {e}'})
            raise

    def prefill(self, tokens: list[int]) -> Prefix:
        return self._call({'op': 'prefill', 'tokens': tokens},
                          lambda: self.engine.prefill(tokens))

    def insert(self, prefix: Prefix, slot: int, settings: SlotSettings) -> StepOutput:
        return self._call({'op': 'insert', 'slot': slot, 'settings': settings.to_json()},
                          lambda: self.engine.insert(prefix, slot, settings))

    def generate(self, masks: Callable[[], np.ndarray] | None = None) -> StepOutput:
        if masks is None:
            return self._call({'op': 'generate'}, self.engine.generate)

        def sent() -> np.ndarray:
            # The followers' forwards are running too: they wait for these masks.
            allowed = masks()
            # Mostly all-ones words: compressed, they cost the followers little.
            packed = base64.b64encode(zlib.compress(allowed.tobytes(), 1)).decode()
            self.leader.broadcast({'op': 'masks', 'allowed': packed, 'shape': allowed.shape})
            return allowed

        return self._call({'op': 'generate', 'masked': True},
                          lambda: self.engine.generate(sent))

    def free(self, slot: int) -> None:
        self._call({'op': 'free', 'slot': slot}, lambda: self.engine.free(slot))

    def reset(self) -> None:
        self._call({'op': 'reset'}, self.engine.reset)

    def embed_begin(self, prompts: list[list[int]]) -> int:
        return self._call({'op': 'embed_begin', 'prompts': prompts},
                          lambda: self.engine.embed_begin(prompts))

    def embed_cancel(self, key: int) -> None:
        self._call({'op': 'embed_cancel', 'key': key}, lambda: self.engine.embed_cancel(key))

    def embed_results(self, block: bool = False) -> list[tuple[int, np.ndarray]]:
        # The followers compute the same steps and drop their results (`follow`).
        return self.engine.embed_results(block)

    @property
    def embedding_work(self) -> bool:
        return self.engine.embedding_work

    def warmup(self, progress=None) -> None:
        self._call({'op': 'warmup'}, lambda: self.engine.warmup(progress))


class _Abandoned(Exception):
    """The leader sent another call where a step's token masks were due."""


class Diverged(RuntimeError):
    """A call failed on the leader or on this follower but not on both: their states differ,
    and the follower stops (the leader then sees it gone)."""


def _connect(address: tuple[str, int], timeout: float) -> socket.socket:
    end = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(address, timeout=10)
        except OSError as e:
            if time.monotonic() > end:
                raise EngineLost(f'cannot reach process 0 at {address[0]}:{address[1]} '
                                 f'within {timeout:.0f} s: {e}') from None
            time.sleep(0.2)


def follow(engine: Engine, process: int, address: tuple[str, int], timeout: float,
           connect_timeout: float = 600.0, interval: float = HEARTBEAT_S) -> int:
    """A follower's life: make every call the leader makes, until it says stop (returns 0).
    When the leader is gone or silent for `timeout` seconds, the process exits at once with
    EXIT_PEER_LOST, even if the device loop is stuck in a collective."""
    sock = _connect(address, connect_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lock = threading.Lock()
    _send(sock, lock, {'process': process})
    calls: list[dict] = []
    ready = threading.Condition()

    def lost(message: str) -> None:
        log.error('process 0 (the leader) %s; exiting', message)
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)

    def read() -> None:
        reader = _Reader(sock)
        try:
            while (message := reader.next(timeout)) is not None:
                if message['op'] == 'ping':
                    continue
                with ready:
                    calls.append(message)
                    ready.notify()
                if message['op'] == 'stop':
                    return
            lost('closed its connection')
        except ConnectionError:
            lost('closed its connection')
        except TimeoutError:
            lost(f'sent nothing for {timeout:.0f} s')
        except (OSError, ValueError) as e:
            lost(f'connection failed: {e}')

    def heartbeat() -> None:
        while True:
            time.sleep(interval)
            try:
                _send(sock, lock, {'op': 'ping'})
            except OSError:
                return  # the reader sees the closed connection

    threading.Thread(target=read, daemon=True, name='glmjax-follow-read').start()
    threading.Thread(target=heartbeat, daemon=True, name='glmjax-heartbeat').start()
    def next_call() -> dict:
        with ready:
            ready.wait_for(lambda: calls)
            return calls.pop(0)

    def masks() -> np.ndarray:
        message = next_call()
        if message['op'] != 'masks':
            # The leader's step failed between the forward and the sampling: it says
            # 'failed' (or stops) next; this call is abandoned as the leader's was.
            with ready:
                calls.insert(0, message)
            raise _Abandoned(message['op'])
        raw = zlib.decompress(base64.b64decode(message['allowed']))
        return np.frombuffer(raw, np.int32).reshape(message['shape']).copy()

    def call(message: dict) -> None:
        nonlocal prefix
        op = message['op']
        if op == 'prefill':
            prefix = engine.prefill(message['tokens'])
        elif op == 'insert':
            engine.insert(prefix, message['slot'], SlotSettings.from_json(message['settings']))
        elif op == 'generate':
            engine.generate(masks if message.get('masked') else None)
            engine.embed_results()  # the leader's are its own: these are only let go
        elif op == 'free':
            engine.free(message['slot'])
        elif op == 'reset':
            engine.reset()
        elif op == 'embed_begin':
            engine.embed_begin(message['prompts'])
        elif op == 'embed_cancel':
            engine.embed_cancel(message['key'])
        elif op == 'warmup':
            engine.warmup()
        else:
            lost(f'sent an unknown call {op!r} (different glmjax versions?)')

    # A call that fails here must have failed on the leader too, which then says 'failed'
    # (and the orchestrator fails its requests and resets or goes on): both go on in step.
    # A failure on one side only means the processes no longer hold the same state: stop.
    prefix, failed = None, None  # failed: (the call, its error) of this process's last call
    while True:
        message = next_call()
        op = message['op']
        if op == 'stop':
            log.info('process 0 stopped serving')
            return 0
        if op == 'failed':
            if failed is None:
                raise Diverged(f"process 0's {message['call']} call failed "
                               f"({message['error']}) where this process's did not")
            log.warning('the %s call failed here and on process 0 alike (%s); going on',
                        *failed)
            failed = None
            continue
        if failed is not None:
            raise Diverged(f"this process's {failed[0]} call failed ({failed[1]}) where "
                           f"process 0's did not")
        try:
            call(message)
        except _Abandoned as e:  # the leader's step failed between forward and sampling
            failed = (op, f'abandoned: process 0 sent {e} where masks were due')
        except Exception as e:
            log.exception('the %s call failed', op)
            failed = (op, f'{type(e).__name__}: {e}')
