"""The persistent compilation cache: a second process finds the first one's programs."""

import os
import subprocess
import sys

SCRIPT = '''
import logging, sys, jax, jax.numpy as jnp
from glmjax import compile_cache
log = logging.getLogger('jax._src.compiler')  # where JAX reports persistent-cache hits
log.setLevel(logging.DEBUG)
log.addHandler(logging.StreamHandler(sys.stderr))
print(compile_cache.enable(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
'''


def test_programs_are_cached_across_processes(tmp_path):
    cache = tmp_path / 'xla'
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    run = lambda: subprocess.run([sys.executable, '-c', SCRIPT, str(cache)], env=env,  # noqa: E731
                                 capture_output=True, text=True, timeout=120, check=True)
    first = run()
    assert first.stdout.strip() == str(cache)
    assert os.listdir(cache), 'nothing was written to the cache'
    assert "Persistent compilation cache hit for 'jit__lambda'" not in first.stderr
    assert "Persistent compilation cache hit for 'jit__lambda'" in run().stderr


def test_off_switch(tmp_path, monkeypatch):
    from glmjax import compile_cache
    monkeypatch.setenv('GLMJAX_COMPILATION_CACHE', 'off')
    assert compile_cache.enable() is None
