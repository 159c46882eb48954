"""Start-up: seconds from launching glmjax-serve to HTTP /health 200 (weights loaded and every
shape compiled), cold (empty compilation cache) and warm (the cache from the cold run).

  .venv/bin/python benchmarks/bench_startup.py --runs 3 [-- extra glmjax-serve flags]
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from absl import app, flags

_RUNS = flags.DEFINE_integer('runs', 3, 'warm runs (one cold run first)')
_PORT = flags.DEFINE_integer('port', 18000, 'HTTP port to use')


def time_to_serving(cache: str, extra: list[str]) -> float:
    env = {**os.environ, 'GLMJAX_COMPILATION_CACHE': cache}
    cmd = [sys.executable, '-m', 'glmjax.serving.server', '--grpc_port', '0', '--http_port',
           str(_PORT.value), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < 600:
            if proc.poll() is not None:
                raise RuntimeError(f'glmjax-serve exited with {proc.returncode}')
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{_PORT.value}/health',
                                            timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError('not serving after 600 s')
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv):
    extra = argv[1:]
    with tempfile.TemporaryDirectory() as d:
        cache = os.path.join(d, 'xla')
        cold = time_to_serving(cache, extra)
        warm = [time_to_serving(cache, extra) for _ in range(_RUNS.value)]
    print(f'time to SERVING: cold {cold:.1f} s; warm median {statistics.median(warm):.1f} s '
          f'(min {min(warm):.1f}, max {max(warm):.1f}); cold / warm = '
          f'{cold / statistics.median(warm):.1f}x')


if __name__ == '__main__':
    app.run(main)
