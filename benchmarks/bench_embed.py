"""Embedding throughput of the engine, in process, on the demo model: many short inputs and
a few long ones, as /v1/embeddings and /v1/rerank send them.

    .venv/bin/python benchmarks/bench_embed.py [--max_batch 8 --max_seq_len 4096]

The engine is made as glmjax-serve makes it (budget measured at warm-up unless given) and
warmed up; each workload runs once untimed (what it compiles), then --repeats times, and
the fastest is kept. Prints input tokens per second per workload. Compare two versions by
running the script under each (PYTHONPATH) in one session, interleaved.
"""

import time

import numpy as np
from absl import app, flags

_MAX_BATCH = flags.DEFINE_integer('max_batch', 8, 'decode slots (as glmjax-serve)')
_MAX_SEQ_LEN = flags.DEFINE_integer('max_seq_len', 4096, 'tokens a sequence holds')
_BUDGET = flags.DEFINE_integer('max_num_batched_tokens', None, 'None: measured at warm-up')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed runs per workload')

WORKLOADS = {'64 x 64 tokens': [64] * 64, '16 x 300 tokens': [300] * 16,
             '2 x 4000 tokens': [4000] * 2}


def main(argv):
    del argv
    from glmjax.serving.default_model import default_model
    from glmjax.serving.paged_engine import PagedEngine
    cfg, params, _ = default_model()
    engine = PagedEngine(cfg, params, _MAX_BATCH.value, _MAX_SEQ_LEN.value,
                         max_num_batched_tokens=_BUDGET.value)
    engine.warmup()
    rng = np.random.default_rng(0)
    print(f'max_batch {_MAX_BATCH.value}, max_seq_len {_MAX_SEQ_LEN.value}, token budget '
          f'{engine.max_num_batched_tokens}')
    for name, lengths in WORKLOADS.items():
        lengths = [min(n, engine.capacity) for n in lengths]
        inputs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
        engine.embed(inputs)
        best = np.inf
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            engine.embed(inputs)
            best = min(best, time.perf_counter() - start)
        print(f'{name:>16}: {sum(lengths) / best:9.0f} tokens/s ({best * 1e3:.0f} ms)')


if __name__ == '__main__':
    app.run(main)
