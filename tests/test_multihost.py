"""Two processes with 4 CPU devices each form one 8-device mesh and run the same sharded
forward as one process does. Also: the multi-process settings from flags and environment.

Run as a script, this file is one worker: `python test_multihost.py CKPT OUT` with the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment set.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {'expert': 4, 'tensor': 2}
TINY = dict(n_routed_experts=16, num_experts_per_tok=4, num_attention_heads=8,
            num_key_value_heads=2, num_hidden_layers=2)


def tokens() -> np.ndarray:
    return np.random.RandomState(3).randint(0, 256, (2, 9)).astype(np.int32)


def worker(checkpoint: str, out: str) -> None:
    """One process: join the others, load the checkpoint sharded over the global mesh, run
    `forward`, gather the logits and save them with this process's expert-shard shapes."""
    sys.path.insert(0, ROOT)
    from glmjax.sharding import distributed
    assert distributed.initialize(cpu_devices=4)

    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    import glmjax
    from glmjax import sharding
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    cfg = glmjax.GlmConfig.from_hf(checkpoint)
    mesh = sharding.make_mesh(MESH)
    params = glmjax.load_hf(checkpoint, cfg, jnp.float32,
                            shardings=sharding.param_shardings(cfg, mesh))
    with jax.set_mesh(mesh):
        logits = glmjax.forward(cfg, params, jnp.asarray(tokens()))
    gate = params['model']['layers'][1]['mlp']['gate']
    np.savez(out, logits=multihost_utils.process_allgather(logits, tiled=True),
             local_gate_shapes=np.array([s.data.shape for s in gate.addressable_shards]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    import jax.numpy as jnp

    import hf_tiny
    from glmjax import GlmConfig, forward, load_hf
    checkpoint = hf_tiny.save(hf_tiny.make_model(seed=5, **TINY), str(tmp_path / 'ckpt'))
    address = f'127.0.0.1:{free_port()}'
    procs = []
    for i in range(2):
        env = {**os.environ, 'JAX_COORDINATOR_ADDRESS': address, 'JAX_NUM_PROCESSES': '2',
               'JAX_PROCESS_ID': str(i), 'JAX_PLATFORMS': 'cpu',
               'PYTHONPATH': os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')])}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, checkpoint, str(tmp_path / f'out{i}.npz')], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f'process {i} failed:\n{log[-3000:]}'

    cfg = GlmConfig.from_hf(checkpoint)
    single = np.asarray(forward(cfg, load_hf(checkpoint, cfg, jnp.float32),
                                jnp.asarray(tokens())))
    for i in range(2):
        out = np.load(tmp_path / f'out{i}.npz')
        np.testing.assert_allclose(out['logits'], single, rtol=0, atol=1e-5)
        # 16 experts over expert=4: each of this process's 4 devices holds 4 of them, and
        # half of each expert's width (moe_mlp over tensor=2).
        assert out['local_gate_shapes'].tolist() == [[4, cfg.moe_intermediate_size // 2,
                                                      cfg.hidden_size]] * 4


def test_settings_from_arguments_then_environment():
    from glmjax.sharding.distributed import settings
    env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4',
           'JAX_PROCESS_ID': '2'}
    assert settings(environ={}) is None
    assert settings(environ=env) == {'coordinator_address': '10.0.0.1:1234',
                                     'num_processes': 4, 'process_id': 2}
    assert settings(process_id=3, environ=env)['process_id'] == 3


def test_bad_settings_name_what_to_fix():
    from glmjax.sharding.distributed import DistributedError, settings
    with pytest.raises(DistributedError, match=r'missing: --num_processes \(or '
                                               r'JAX_NUM_PROCESSES\), --process_id'):
        settings('127.0.0.1:1', environ={})
    with pytest.raises(DistributedError, match=r'process_id must be in \[0, num_processes=2\)'):
        settings('127.0.0.1:1', 2, 2, environ={})
    with pytest.raises(DistributedError, match='needs a port'):
        settings('127.0.0.1', 2, 0, environ={})
    with pytest.raises(DistributedError, match="JAX_PROCESS_ID='one' is not an integer"):
        settings(environ={'JAX_PROCESS_ID': 'one'})


if __name__ == '__main__':
    worker(sys.argv[1], sys.argv[2])
