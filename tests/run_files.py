"""Runs each test file in a process of its own, two at a time, then prints one closing line
for the whole.

Why one process per file: a full single-process run hung in tests/test_serving.py (its RPCs
waiting on server streams stuck in flow control) although that file passes alone and after
each suspect module tried; the cross-module cause is not found yet. One process per file keeps
what one file leaves behind (threads, servers, channels, compiled programs) from reaching
another. Two at a time (GLMJAX_TEST_JOBS): one process keeps about one core busy (compiling is
mostly serial), and the tests hold no timing assumptions that a busy machine breaks. The
slowest files start first, so that the two lines end together. The run's processes share one
persistent compilation cache (removed at the end): many files compile the same tiny models'
programs, and loading one is much faster than compiling it.
Usage: python tests/run_files.py [pytest args...]"""

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

# Measured slowest first (seconds on a quiet 2-core machine, one file at a time).
SLOWEST = ('test_multihost_serving', 'test_paged_engine_spec', 'test_paged_engine',
           'test_serving_paged', 'test_serving', 'test_inference',
           'test_sharding', 'test_serving_constrained', 'test_demo_model_server')


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, 'tests', 'test_*.py')))
    rank = {name: i for i, name in enumerate(SLOWEST)}
    files.sort(key=lambda f: rank.get(os.path.basename(f)[:-3], len(SLOWEST)))
    totals = {'passed': 0, 'failed': 0, 'error': 0, 'skipped': 0}
    bad, lock = [], threading.Lock()
    cache = tempfile.mkdtemp(prefix='glmjax-test-xla-')
    # Servers started as processes by the tests use the same cache (GLMJAX_COMPILATION_CACHE).
    env = {'JAX_COMPILATION_CACHE_DIR': cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
           'GLMJAX_COMPILATION_CACHE': cache, **os.environ}

    def run(path: str) -> None:
        name = os.path.relpath(path, root)
        start = time.monotonic()
        done = subprocess.run([sys.executable, '-m', 'pytest', '-q', name, *sys.argv[1:]],
                              cwd=root, env=env, capture_output=True, text=True)
        tail = done.stdout.strip().splitlines()[-1:] or ['']
        with lock:
            print(f'{name}: {tail[0]} [{time.monotonic() - start:.0f} s]', flush=True)
            for count, kind in re.findall(r'(\d+) (passed|failed|errors?|skipped)', tail[0]):
                totals['error' if kind.startswith('error') else kind] += int(count)
            if done.returncode != 0:
                bad.append(name)
                print(done.stdout[-6000:], done.stderr[-3000:], sep='\n', flush=True)

    jobs = int(os.environ.get('GLMJAX_TEST_JOBS', '2'))
    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            list(pool.map(run, files))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if bad:
        print('failed files: ' + ', '.join(sorted(bad)))
    print(f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, "
          f"{totals['skipped']} skipped")
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
