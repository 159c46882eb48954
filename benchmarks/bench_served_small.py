"""The `small` model (benchmarks/configs.py) fp32 through the real server against transformers,
side by side in one run: one stream on a server sized for 32 sequences, one stream on a
server limited to one, 32 streams on the first, and transformers' greedy `generate` at
batch 1 and 32 on the same prompt and output lengths.

  .venv/bin/python benchmarks/bench_served_small.py [--input_len 128 --output_len 128]

Each server is a `glmjax-serve --hf_dir` subprocess (random weights written by transformers,
the demo model's tokenizer beside them; prompts are token ids, stop tokens ignored); the
load is benchmarks/bench_serving.py over gRPC. Decode tokens/s of transformers is
(batch x (output_len - 1)) / (generate time - prefill time), as bench_model.py counts it;
the server's is output tokens / wall time, prefill included, so it is the harder figure.
"""

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, HERE)

_IN = flags.DEFINE_integer('input_len', 128, 'prompt tokens')
_OUT = flags.DEFINE_integer('output_len', 128, 'generated tokens per request')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'transformers runs per figure')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def served(hf_dir: str, max_batch: int, loads: list[tuple[int, int]]) -> dict[int, float]:
    """Output tokens/s per concurrency: loads are (concurrency, number of prompts)."""
    port = free_port()
    cmd = [sys.executable, '-m', 'glmjax.serving.server', '--hf_dir', hf_dir, '--dtype',
           'float32', '--grpc_host', '127.0.0.1', '--grpc_port', str(port), '--http_port',
           '-1', '--max_batch', str(max_batch), '--max_seq_len', str(_IN.value + _OUT.value)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        out = {}
        for concurrency, n in loads:
            for _ in range(600):  # until the server answers (weights loaded, compiled)
                run = subprocess.run(
                    [sys.executable, os.path.join(HERE, 'bench_serving.py'), '--protocol',
                     'grpc', '--url', f'127.0.0.1:{port}', '--concurrency', str(concurrency),
                     '--num_prompts', str(n), '--input_len', str(_IN.value), '--output_len',
                     str(_OUT.value)], capture_output=True, text=True, cwd=ROOT)
                if run.returncode == 0:
                    break
                if server.poll() is not None:
                    raise RuntimeError(f'glmjax-serve exited: {server.stderr.read()[-2000:]}')
                time.sleep(1)
            else:
                raise RuntimeError(f'no answer: {run.stderr[-2000:]}')
            out[concurrency] = float(re.search(r'([\d.]+) output tok/s', run.stdout).group(1))
        return out
    finally:
        server.terminate()
        server.wait()


def transformers_decode(model, vocab: int, batch: int) -> float:
    import numpy as np
    import torch
    T, N = _IN.value, _OUT.value
    prompts = torch.from_numpy(np.random.RandomState(batch).randint(0, vocab, (batch, T)))

    def timed(fn):
        times = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        model(prompts)  # warm-up
        pre = timed(lambda: model(prompts))
        full = timed(lambda: model.generate(prompts, max_new_tokens=N, min_new_tokens=N,
                                            do_sample=False, eos_token_id=None, pad_token_id=0))
    return batch * (N - 1) / (full - pre)


def main(argv):
    del argv
    import torch
    from configs import CONFIGS

    import hf_tiny
    from glmjax.serving.server import DEMO_MODEL
    torch.set_num_threads(2)  # the two cores XLA:CPU uses
    model = hf_tiny.make_model(seed=0, **CONFIGS['small'])
    with tempfile.TemporaryDirectory() as d:
        hf_tiny.save(model, d)
        shutil.copy(os.path.join(DEMO_MODEL, 'tokenizer.json'), d)
        wide = served(d, 32, [(1, 8), (32, 64)])
        one = served(d, 1, [(1, 8)])
    vocab = CONFIGS['small']['vocab_size']
    hf1, hf32 = transformers_decode(model, vocab, 1), transformers_decode(model, vocab, 32)
    print(f'small fp32, prompt {_IN.value}, output {_OUT.value} tokens; output tokens/s')
    print(f'server max_batch 32, 1 stream:   {wide[1]:8.1f}  ({wide[1] / one[1]:.2f}x the '
          f'1-sequence server, {wide[1] / hf1:.2f}x transformers batch 1)')
    print(f'server max_batch 1, 1 stream:    {one[1]:8.1f}')
    print(f'transformers batch 1 (decode):   {hf1:8.1f}')
    print(f'server max_batch 32, 32 streams: {wide[32]:8.1f}  ({wide[32] / hf32:.2f}x '
          'transformers batch 32)')
    print(f'transformers batch 32 (decode):  {hf32:8.1f}')


if __name__ == '__main__':
    app.run(main)
