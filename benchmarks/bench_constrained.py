"""Constrained decoding at scale, through the HTTP API of a paged server in this process.

  .venv/bin/python benchmarks/bench_constrained.py --weights demo --samples 200
  .venv/bin/python benchmarks/bench_constrained.py --weights random --samples 200

For each of five JSON schemas (nested objects with required and optional fields, an array of
item schemas, enums, numbers and booleans, an array of patterned strings) it asks --samples
chat completions at temperature 1 (one seed each) and validates every answer with
`jsonschema`; then json_object, a regex, a choice and tool_choice "required" the same way
(the tool call's arguments against its parameter schema). It prints the failures per kind
(goal: none; an answer cut by max_tokens counts as failing, and how many were is printed),
each schema's grammar compile time on this tokenizer, and output tokens/s at
--concurrency streams with every request constrained against the same requests unconstrained
(stop tokens ignored, as many tokens each), side by side in this run; and what an
unconstrained request's own decode rate is when one request in 8 is constrained.

--weights demo is the embedded demo model; random is the tiny random-weight model, which
writes noise unless constrained.
"""

import concurrent.futures
import json
import logging
import os
import re
import time

import httpx
import jax
import jsonschema
from absl import app, flags

_WEIGHTS = flags.DEFINE_enum('weights', 'demo', ['demo', 'random'], 'the model')
_SAMPLES = flags.DEFINE_integer('samples', 200, 'sampled completions per schema and kind '
                                '(0: only the compile times and the throughput)')
_CONCURRENCY = flags.DEFINE_integer('concurrency', 8, 'requests in flight (and engine slots)')
_ONLY = flags.DEFINE_list('only', [], 'run only the kinds whose names contain one of these, '
                          'and no throughput part')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 960, 'tokens per answer at most (the '
                                   'engine holds 1024 per sequence)')

SCHEMAS = {
    # Closed objects: an open one lets a model write further properties until max_tokens.
    'nested, optional fields': {'type': 'object', 'properties': {
        'name': {'type': 'string', 'maxLength': 8},
        'owner': {'type': 'object', 'properties': {
            'id': {'type': 'integer', 'minimum': 0, 'maximum': 999}}, 'required': ['id'],
            'additionalProperties': False}},
        'required': ['owner'], 'additionalProperties': False},
    'array of item schemas': {'type': 'array', 'items': {'type': 'object', 'properties': {
        'x': {'type': 'integer', 'minimum': -9, 'maximum': 9}}, 'required': ['x'],
        'additionalProperties': False}, 'minItems': 1, 'maxItems': 3},
    'enums': {'type': 'object', 'properties': {'color': {'enum': ['red', 'green', 'blue']},
                                               'n': {'const': 3}},
              'required': ['color', 'n'], 'additionalProperties': False},
    'numbers and booleans': {'type': 'object', 'properties': {
        'ok': {'type': 'boolean'}, 'score': {'type': 'number', 'minimum': 0, 'maximum': 1},
        'count': {'type': 'integer', 'minimum': 1, 'maximum': 5}},
        'required': ['ok', 'score', 'count'], 'additionalProperties': False},
    'patterned strings': {'type': 'object', 'properties': {'tags': {
        'type': 'array', 'maxItems': 2, 'items': {'type': 'string', 'pattern': '^[a-z]{1,4}$'}}},
        'required': ['tags'], 'additionalProperties': False},
}
TOOLS = [{'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'the weather in a city',
    'parameters': {'type': 'object', 'properties': {
        'city': {'type': 'string', 'maxLength': 12},
        'days': {'type': 'integer', 'minimum': 1, 'maximum': 7}},
        'required': ['city', 'days'], 'additionalProperties': False}}}]
REGEX = '[a-c]{2,5}-[0-9]{1,3}'
WORDS = ['alpha', 'beta', 'gamma']
ASK = [{'role': 'user', 'content': 'Describe the weather in Paris as JSON.'}]


def start_server():
    import jax.numpy as jnp

    from glmjax.serving.paged_engine import PagedEngine
    from glmjax.serving.server import load_model, start_http
    from glmjax.serving.service import GlmServer
    if _WEIGHTS.value == 'demo':
        cfg, params, tok, name = load_model(dtype='float32')
    else:
        from glmjax.serving import default_model
        (cfg, params, tok), name = default_model.default_model(jnp.float32), 'random'
    engine = PagedEngine(cfg, params, _CONCURRENCY.value, 1024, 4, page_size=16,
                         max_num_batched_tokens=256)
    server = GlmServer(engine, tok, cfg, name, 4 * _CONCURRENCY.value).start()
    server.warmup()
    return server, start_http(server, None, '127.0.0.1', 0), tok, cfg


def chat(url, seed, **body):
    body = {'messages': ASK, 'temperature': 1.0, 'max_tokens': _MAX_TOKENS.value, 'seed': seed,
            'chat_template_kwargs': {'enable_thinking': False}} | body
    r = httpx.post(url + '/v1/chat/completions', json=body, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f'{r.status_code}: {r.text}')
    return r.json()


def check_many(url, pool, kinds):
    """kinds: name -> (request fields, check(choice) raising on a bad answer)."""
    for name, (fields, check) in kinds.items():
        start = time.perf_counter()
        answers = list(pool.map(lambda s, f=fields: chat(url, s, **f)['choices'][0],
                                range(_SAMPLES.value)))
        bad = []
        for a in answers:
            try:
                check(a)
            except Exception as e:  # noqa: BLE001 -- every failure counts, whatever it is
                bad.append(f'{a["finish_reason"]}: {type(e).__name__}: {e}'[:400])
        cut = sum(a['finish_reason'] == 'length' for a in answers)
        print(f'| {name} | {len(answers)} | {len(bad)} | {cut} | '
              f'{time.perf_counter() - start:.0f} s |', flush=True)
        for b in bad[:3]:
            print(f'|   failure: {b} | | | | |')


def content(choice) -> str:
    return choice['message']['content'] or ''


def must(ok, choice) -> None:
    if not ok:
        raise AssertionError(f'{choice["finish_reason"]}: {content(choice)!r}')


def valid_json(schema):
    return lambda c: jsonschema.validate(json.loads(content(c)), schema)


def a_tool_call(c):
    calls = c['message'].get('tool_calls') or []
    assert calls and c['finish_reason'] == 'tool_calls', c
    for call in calls:
        assert call['function']['name'] == 'get_weather'
        jsonschema.validate(json.loads(call['function']['arguments']),
                            TOOLS[0]['function']['parameters'])


def throughput(url, pool, fields_of):
    """4 x concurrency requests, the fields of request i fields_of(i): (output tokens/s in
    all, tokens per answer, and per request (fields_of(i), its output tokens/s))."""
    n = 4 * _CONCURRENCY.value

    def timed(i):
        begin = time.perf_counter()
        r = chat(url, i, **fields_of(i))
        return r['usage']['completion_tokens'], time.perf_counter() - begin

    start = time.perf_counter()
    out = list(pool.map(timed, range(n)))
    tokens = sum(t for t, _ in out)
    return (tokens / (time.perf_counter() - start), tokens / n,
            [(fields_of(i), t / dt) for i, (t, dt) in enumerate(out)])


def mean(xs) -> float:
    return sum(xs) / len(xs)


def main(argv):
    del argv
    logging.getLogger('httpx').setLevel(logging.WARNING)  # not a line per request
    from glmjax.serving.constraints import ConstraintCompiler, ConstraintSpec
    server, front, tok, cfg = start_server()
    url = f'http://127.0.0.1:{front.port}'
    print(f'# {_WEIGHTS.value} weights, {os.cpu_count()} cores, {jax.default_backend()}, '
          f'{time.strftime("%Y-%m-%d")}; {_SAMPLES.value} samples per kind, temperature 1\n')
    compiler = ConstraintCompiler(tok, cfg.vocab_size, cfg.eos_token_ids)
    print('| schema | grammar compile ms |\n|---|---|')
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        compiler.compile(ConstraintSpec.json_schema(schema))
        print(f'| {name} | {1e3 * (time.perf_counter() - start):.1f} |')
    print('\n| kind | answers | failing | cut by max_tokens | time |\n|---|---|---|---|---|')
    kinds = {f'json_schema: {name}': (
        {'response_format': {'type': 'json_schema', 'json_schema': {'name': 'out',
                                                                    'schema': schema}}},
        valid_json(schema)) for name, schema in SCHEMAS.items()}
    kinds['json_object'] = ({'response_format': {'type': 'json_object'}},
                            lambda c: must(isinstance(json.loads(content(c)), dict), c))
    kinds['regex'] = ({'structured_outputs': {'regex': REGEX}},
                      lambda c: must(re.fullmatch(REGEX, content(c)), c))
    kinds['choice'] = ({'structured_outputs': {'choice': WORDS}},
                       lambda c: must(content(c) in WORDS, c))
    # The tools make the prompt longer: less room for the answer in 1024 positions.
    kinds['tool_choice required'] = ({'tools': TOOLS, 'tool_choice': 'required',
                                      'max_tokens': min(_MAX_TOKENS.value, 512)}, a_tool_call)
    try:
        with concurrent.futures.ThreadPoolExecutor(_CONCURRENCY.value) as pool:
            if _SAMPLES.value:
                check_many(url, pool, {k: v for k, v in kinds.items()
                                       if not _ONLY.value or any(o in k for o in _ONLY.value)})
            if _ONLY.value:
                return
            fmt = {'type': 'json_schema', 'json_schema': {
                'name': 'out', 'schema': SCHEMAS['nested, optional fields']}}
            constrained = throughput(url, pool, lambda i: {'response_format': fmt})
            # The same number of tokens per answer, free: stop tokens ignored.
            plain = {'ignore_eos': True, 'max_tokens': max(1, round(constrained[1]))}
            free = throughput(url, pool, lambda i: plain)
            # One request in 8 constrained: what do the others pay for it?
            beside = throughput(url, pool, lambda i: plain if i % 8 else {'response_format': fmt})
        print(f'\n| {_CONCURRENCY.value} streams | output tok/s | tokens per answer |\n'
              f'|---|---|---|\n| unconstrained | {free[0]:.1f} | {free[1]:.0f} |\n'
              f'| every request json_schema | {constrained[0]:.1f} | {constrained[1]:.0f} |\n'
              f'ratio constrained / unconstrained: {constrained[0] / free[0]:.2f}')
        alone = mean([r for _, r in free[2]])
        with_them = mean([r for f, r in beside[2] if f is plain])
        print(f'\nan unconstrained request\'s own tokens/s: {alone:.1f} among unconstrained '
              f'ones, {with_them:.1f} when one request in 8 is constrained '
              f'({with_them / alone:.2f}x)')
    finally:
        front.stop()
        server.shutdown(grace=5)


if __name__ == '__main__':
    app.run(main)
