"""MTP speculative decoding of the paged engine on the trained demo model, in one process:
how many drafts are accepted on held-out prompts, and what that does to decode tokens/s.

  .venv/bin/python benchmarks/bench_speculative.py --batches 1,8,32 --ks 1,2,3 \
      --new_tokens 128 --prompts 32

(the defaults; about 15 minutes on the 2-core CPU VM, over 10 of them compiling: warm-up
takes 1.5 min for k=0 and 3.5 min for k=3 at max_batch 32).

Prompts (never seen in training, glmjax/corpus.py): "code" is the signature of a function
of a held-out standard-library file, as it stands in its file (train.py's signature
evaluation); "chat" alternates a held-out function's docstring chat and a held-out tool
conversation, cut before its last assistant turn and rendered with the generation prompt
(thinking on or off as the corpus drew it), so the model writes that turn.

1. Acceptance: every prompt of a kind decoded once per k and temperature, --new_tokens at
   most, ending at the model's eos ids, from the engine's vLLM-style counters: per draft
   position j, accepted at j / drafts (a draft is a verify step of one row), and the mean
   accepted length 1 + accepted tokens / drafts (tokens a step emits, cut-offs aside).
2. Throughput: --batches rows of the same prompts (code and chat alternately), greedy, stop
   ids ignored. All rows are inserted and `generate()` runs until no prompt is left to
   compute and every row has its first token; the calls after that are timed, each blocked
   on its outputs, until every row has --new_tokens more. tokens/s = tokens those calls
   emitted (the last call overshoots a little) / their wall time; median of --repeats, the
   k values interleaved. One engine per k, max_batch = the largest batch, warmed up first.
"""

import datetime
import os
import random
import statistics
import subprocess
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import glmjax
from glmjax import corpus as C
from glmjax.config import GlmConfig
from glmjax.hf import load_hf
from glmjax.serving.engine import SlotSettings
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.tokenizer import Tokenizer

_BATCHES = flags.DEFINE_list('batches', ['1', '8', '32'], 'batch sizes of the throughput part')
_KS = flags.DEFINE_list('ks', ['1', '2', '3'], 'speculative tokens per step (k=0 is added)')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'new tokens per row')
_PROMPTS = flags.DEFINE_integer('prompts', 32, 'held-out prompts per kind (acceptance)')
_TEMPS = flags.DEFINE_list('temperatures', ['0', '1.0'], 'temperatures of the acceptance part')
_STEPS = flags.DEFINE_integer('steps_per_call', 4, 'decode steps per engine call')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed runs per batch and k (median, min-max)')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'weights and pages')
_SPEC_MAX = flags.DEFINE_integer('speculative_max_batch', None, 'the engines\' '
                                 'speculative_max_batch (default: measured, as the server; '
                                 'the largest batch: every call speculates)')

PAGE, CHUNK = 16, 512  # page_size, max_num_batched_tokens
# glmjax.serving.server.DEMO_MODEL, whose import would define the server's flags (--dtype).
DEMO_MODEL = os.path.join(os.path.dirname(glmjax.__file__), 'demo_model')


def held_out_functions():
    fns = [fn for p, t in C.stdlib_files() if C.is_held_out(p) for fn in C.functions(p, t)]
    random.Random(0).shuffle(fns)
    return fns


def code_prompts(fns, n: int) -> list[str]:
    # Ending at the colon, indented as in the file: a prompt ending in a newline would split
    # the newline-plus-indent token that training always saw whole.
    return [textwrap.indent(fn.signature, ' ' * fn.indent) for fn in fns[:n]]


def chat_prompts(fns, n: int) -> list[str]:
    template, rng, out = C.chat_template(), random.Random(1), []
    for i in range(n):
        if i % 2 == 0:  # functions after the code prompts' ones, so no prompt repeats
            messages, thinking = C.function_chat(fns[(n + i) % len(fns)], rng)
            tools = None
        else:
            messages, thinking = C.tool_conversation(rng, held=True)
            tools = C.TOOLS
        last = max(j for j, m in enumerate(messages) if m['role'] != 'assistant')
        kwargs = {} if thinking else {'enable_thinking': False}
        out.append(template.render(messages[:last + 1], tools=tools,
                                   add_generation_prompt=True, **kwargs))
    return out


def counters(eng) -> tuple[int, int, list[int]]:
    eng._fetch(keep=0)  # the counters follow the fetched outputs
    m = eng.metrics()
    return (m['spec_decode_num_drafts'], m['spec_decode_num_accepted_tokens'],
            list(m['spec_decode_num_accepted_tokens_per_pos']))


def acceptance(eng, prompts, temperature: float, stop_ids) -> tuple[int, int, list[int]]:
    """Decodes every prompt, as many at a time as there are slots; returns the drafts,
    accepted tokens and accepted per position that this took."""
    d0, a0, p0 = counters(eng)
    waiting, busy = list(enumerate(prompts)), set()
    while waiting or busy:
        for s in range(eng.max_batch):
            if s not in busy and waiting:
                i, p = waiting.pop(0)
                eng.insert(eng.prefill(p), s, SlotSettings(
                    max_new=_NEW.value, stop_ids=stop_ids, temperature=temperature, seed=i))
                busy.add(s)
        done = np.asarray(eng.generate().done)
        for s in [s for s in busy if done[s] and eng._filling[s] is None]:
            eng.free(s)
            busy.discard(s)
    d1, a1, p1 = counters(eng)
    return d1 - d0, a1 - a0, [b - a for a, b in zip(p0, p1)]


def throughput(eng, prompts, batch: int) -> float:
    """Steady-state greedy decode tokens/s of `batch` rows (see the module docstring)."""
    for s in range(batch):
        p = prompts[s % len(prompts)]
        eng.insert(eng.prefill(p), s, SlotSettings(max_new=eng.capacity - len(p),
                                                   temperature=0.0, stop_ids=()))
    first = np.zeros(batch, np.int64)
    while any(eng._filling[s] is not None for s in range(batch)) or (first == 0).any():
        first += np.asarray(eng.generate().valid)[:batch].sum(axis=1)
    got = np.zeros(batch, np.int64)
    start = time.perf_counter()
    while (got < _NEW.value).any():
        step = eng.generate()
        np.asarray(step.tokens)  # the sync: the call's tokens are on the host
        got += np.asarray(step.valid)[:batch].sum(axis=1)
        if np.asarray(step.done)[:batch].any():
            raise RuntimeError('a row ran out of context before --new_tokens: max_seq_len is '
                               'too small for this run')
    elapsed = time.perf_counter() - start
    for s in range(batch):
        eng.free(s)
    eng._fetch(keep=0)
    return got.sum() / elapsed


def spread(xs) -> str:
    return f'{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})' if len(xs) > 1 else \
        f'{xs[0]:.1f}'


def main(argv):
    del argv
    batches, ks = [int(b) for b in _BATCHES.value], [int(k) for k in _KS.value]
    temps = [float(t) for t in _TEMPS.value]
    cfg = GlmConfig.from_hf(DEMO_MODEL)
    params = load_hf(DEMO_MODEL, cfg, jnp.dtype(_DTYPE.value))
    tok = Tokenizer.from_dir(DEMO_MODEL)
    fns = held_out_functions()
    kinds = {'code': code_prompts(fns, _PROMPTS.value), 'chat': chat_prompts(fns, _PROMPTS.value)}
    ids = {kind: [tok.encode(p) for p in ps] for kind, ps in kinds.items()}
    mixed = [p for pair in zip(ids['code'], ids['chat']) for p in pair] or [tok.encode('def f')]
    # The attention reads every page of a row's table, so the context is kept to what the
    # run needs: the longest prompt, the new tokens, the tokens the rows decode while the
    # others' prompts are computed, and a call's overshoot; the same for every k.
    widest = max(batches)
    longest = max(len(p) for p in mixed + ids['code'] + ids['chat'])
    prompt_tokens = sum(len(mixed[s % len(mixed)]) for s in range(widest))
    # (Twice the estimate of the first: chunks also wait for pages; a row that still runs
    # out of context stops the run with an error, never a wrong figure.)
    margin = 2 * (prompt_tokens // (CHUNK - widest)) + 64 + 2 * _STEPS.value * (max(ks) + 1)
    max_seq_len = min(cfg.max_position_embeddings,
                      -(-(longest + _NEW.value + margin) // PAGE) * PAGE)
    engines = {}
    for k in [0, *ks]:
        t = time.perf_counter()
        engines[k] = PagedEngine(cfg, params, max_batch=max(widest, 1), max_seq_len=max_seq_len,
                                 steps_per_call=_STEPS.value, page_size=PAGE,
                                 max_num_batched_tokens=max(CHUNK, widest),
                                 speculative_tokens=k, speculative_max_batch=_SPEC_MAX.value)
        engines[k].warmup()
        print(f'k={k}: engine built and warmed up in {time.perf_counter() - t:.1f} s',
              flush=True)

    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = 'unknown'
    print(f'\n{datetime.date.today()}, commit {commit}, {os.cpu_count()} CPUs, jax '
          f'{jax.__version__} backend {jax.default_backend()}; demo model, {_DTYPE.value}, '
          f'steps_per_call {_STEPS.value}, page_size {PAGE}, max_seq_len {max_seq_len}')

    if _PROMPTS.value:
        lens = {kind: [len(p) for p in ps] for kind, ps in ids.items()}
        print(f'\nAcceptance: {_PROMPTS.value} held-out prompts per kind (code '
              f'{min(lens["code"])}-{max(lens["code"])} tokens, chat '
              f'{min(lens["chat"])}-{max(lens["chat"])}), at most {_NEW.value} new tokens, '
              f'ending at eos ids {cfg.eos_token_ids}, max_batch {widest}\n')
        print('| prompts | temperature | k | drafts | accepted / drafts per position | '
              'mean accepted length |')
        print('|---|---|---|---|---|---|')
        for kind in kinds:
            for temp in temps:
                for k in ks:
                    drafts, accepted, per_pos = acceptance(engines[k], ids[kind], temp,
                                                           cfg.eos_token_ids)
                    rates = ' / '.join(f'{a / max(drafts, 1):.2f}' for a in per_pos)
                    print(f'| {kind} | {temp:g} | {k} | {drafts} | {rates} | '
                          f'{1 + accepted / max(drafts, 1):.2f} |', flush=True)

    if _SPEC_MAX.value is None:
        for k in ks:
            costs = ', '.join(f'{b}: {c:.2f}' for b, c in engines[k].spec_cost.items())
            print(f'k={k}: a speculative call over a plain one, by rows, measured: {costs}')
    print(f'\nThroughput: steady-state greedy decode, {_NEW.value} new tokens per row, stop '
          f'ids ignored, tokens/s, median (min-max) of {_REPEATS.value}; speed-up vs k=0; '
          f'[the share of the runs\' decode calls that speculated]\n')
    print('| batch | k=0 | ' + ' | '.join(f'k={k}' for k in ks) + ' |')
    print('|---|---|' + '---|' * len(ks))
    for batch in batches:
        rates = {k: [] for k in engines}
        spec = {k: [0, 0] for k in engines}  # speculative, all decode calls timed
        for _ in range(_REPEATS.value):
            for k, eng in engines.items():
                before = dict(eng.spec_calls)
                rates[k].append(throughput(eng, mixed, batch))
                spec[k][0] += eng.spec_calls['speculative'] - before['speculative']
                spec[k][1] += sum(eng.spec_calls.values()) - sum(before.values())
        base = statistics.median(rates[0])
        cells = [f'{spread(rates[k])} ({statistics.median(rates[k]) / base:.2f}x) '
                 f'[{spec[k][0] / max(spec[k][1], 1):.0%}]' for k in ks]
        print(f'| {batch} | {spread(rates[0])} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    app.run(main)
