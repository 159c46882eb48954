"""The lockstep protocol in one process, over its real sockets, with engines that record their
calls and fail where told: a call that fails on the leader and a follower alike is survived
by both (the follower goes on in step: the leader's requests fail, not the server); a call
that fails on one side only stops the follower with the reason."""

import threading

import numpy as np
import pytest

from glmjax.serving import lockstep


class Recorder:
    """An engine that records its calls and raises on the generate calls numbered in `fail`
    (0 = the first)."""
    max_batch, max_seq_len, vocab_size, steps_per_call, buckets = 2, 64, 16, 1, (8,)

    def __init__(self, fail=()):
        self.calls, self.fail, self.generates = [], set(fail), 0

    def generate(self, masks=None):
        n, self.generates = self.generates, self.generates + 1
        if masks is not None:
            masks()
        self.calls.append(f'generate{n}')
        if n in self.fail:
            raise ValueError(f'generate {n} fails')
        return np.zeros(1)

    def reset(self):
        self.calls.append('reset')

    def free(self, slot):
        self.calls.append(f'free{slot}')

    def embed_results(self, block=False):
        return []


def pair(leader_fails=(), follower_fails=()):
    """A leader engine and a running follower (its result or exception lands in `out`)."""
    leader = lockstep.Leader(0, 1, timeout=30)
    port = leader._server.getsockname()[1]
    mine, theirs, out = Recorder(leader_fails), Recorder(follower_fails), {}

    def follow():
        try:
            out['code'] = lockstep.follow(theirs, 1, ('127.0.0.1', port), timeout=30)
        except Exception as e:
            out['error'] = e
    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    leader.start(on_failure=lambda message: out.setdefault('lost', message))
    return lockstep.LeaderEngine(mine, leader), leader, mine, theirs, thread, out


def test_a_call_failing_on_both_sides_is_survived(monkeypatch):
    monkeypatch.setattr(lockstep, 'LOST_WAIT_S', 0.1)
    engine, leader, mine, theirs, thread, out = pair(leader_fails={1}, follower_fails={1})
    engine.generate()
    with pytest.raises(ValueError, match='generate 1 fails'):
        engine.generate()
    engine.reset()  # what the orchestrator does after a failed step
    engine.generate(masks=lambda: np.ones((2, 1), np.int32))  # a masked step too

    def broken():  # the leader's host fails between the forward and the sampling
        raise RuntimeError('no masks')
    with pytest.raises(RuntimeError, match='no masks'):
        engine.generate(masks=broken)
    engine.reset()
    engine.free(0)
    leader.close()
    thread.join(30)
    assert out == {'code': 0}
    assert mine.calls == ['generate0', 'generate1', 'reset', 'generate2', 'reset', 'free0']
    # The follower's abandoned step never got its masks: it stopped where the leader did.
    assert theirs.calls == mine.calls


@pytest.mark.parametrize('side', ['leader', 'follower'])
def test_a_call_failing_on_one_side_only_stops_the_follower(monkeypatch, side):
    monkeypatch.setattr(lockstep, 'LOST_WAIT_S', 0.1)
    fails = {'leader_fails' if side == 'leader' else 'follower_fails': {0}}
    engine, leader, mine, theirs, thread, out = pair(**fails)
    if side == 'leader':
        with pytest.raises(ValueError):
            engine.generate()
    else:
        engine.generate()
        engine.free(1)  # the follower finds out at the next call
    thread.join(30)
    assert isinstance(out.get('error'), lockstep.Diverged)
    if side == 'leader':
        assert "process 0's generate call failed (ValueError: generate 0 fails)" in str(
            out['error'])
    else:
        assert "this process's generate call failed (ValueError: generate 0 fails)" in str(
            out['error'])
        assert 'free1' not in theirs.calls  # it stopped before following on
    leader.close()
