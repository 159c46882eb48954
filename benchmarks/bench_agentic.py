"""A multi-turn agentic replay over HTTP (/v1/chat/completions): prefix caching's benchmark.

Every conversation shares one long system prompt with tool definitions (2-4K tokens with the
demo model's tokenizer; the first turn's `usage.prompt_tokens` is printed, so check it for
another model), and its history grows: each turn sends the whole conversation so far, the
previous answer (with its tool calls, and a canned result for each) and a new user message.
Conversations run concurrently, the turns of one conversation one after the other. Greedy,
thinking off, at most --max_tokens per answer, so that two servers given the same model do the
same work (the completion tokens are printed to check it).

The script starts nothing. Start a paged server with prefix caching on, then one with it off
(the demo model's context is 4,096 tokens), for example:
  .venv/bin/glmjax-serve --max_seq_len 4096 --max_batch 8 --http_port 8000
  .venv/bin/python benchmarks/bench_agentic.py --url http://127.0.0.1:8000 --label on
  (again with --noprefix_caching, --label off)
or give both servers at once, run one after the other, with their ratio printed:
  .venv/bin/python benchmarks/bench_agentic.py --url_on http://127.0.0.1:8000 \
      --url_off http://127.0.0.1:8001

Prints per server: median and p90 time to first token (the first streamed chunk with any
content, reasoning or tool call), the wall time of the whole replay, and the cached-token
share: the sum of usage.prompt_tokens_details.cached_tokens over the sum of prompt_tokens.
"""

import asyncio
import dataclasses
import json
import logging
import statistics
import time

from absl import app, flags

_URL = flags.DEFINE_string('url', 'http://127.0.0.1:8000', 'HTTP base URL of one server')
_LABEL = flags.DEFINE_string('label', '', 'what to call the --url server in the output')
_URL_ON = flags.DEFINE_string('url_on', '', 'a server with prefix caching on (with --url_off)')
_URL_OFF = flags.DEFINE_string('url_off', '', 'a server with prefix caching off')
_CONVERSATIONS = flags.DEFINE_integer('conversations', 8, 'concurrent conversations')
_TURNS = flags.DEFINE_integer('turns', 8, 'requests per conversation')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 48, 'tokens per answer at most')
_KEY = flags.DEFINE_string('api_key', '', 'bearer token, if the server wants one')
_MODEL = flags.DEFINE_string('model', '', 'the model field (default: the first of /v1/models)')


# ---------------------------------------------------------------------------------------
# The workload: deterministic, plain English and Python, so any tokenizer handles it.

TOOLS = [
    ('read_file', 'Read a text file of the repository and return its contents with line '
     'numbers. Use it before you change a file, and read only the lines you need when the '
     'file is long.', {
         'path': ('string', 'path of the file, relative to the repository root'),
         'start_line': ('integer', 'first line to return, counting from 1'),
         'end_line': ('integer', 'last line to return; the end of the file when omitted')},
     ['path']),
    ('write_file', 'Write a whole file, replacing what it held. Prefer edit_file for small '
     'changes: it is shorter and it fails loudly when the file changed under you.', {
         'path': ('string', 'path of the file, relative to the repository root'),
         'content': ('string', 'the complete new text of the file')},
     ['path', 'content']),
    ('edit_file', 'Replace one exact piece of text in a file by another. The old text must '
     'occur exactly once in the file; include enough lines around it to make it unique.', {
         'path': ('string', 'path of the file, relative to the repository root'),
         'old_text': ('string', 'the text to replace, exactly as it is in the file'),
         'new_text': ('string', 'the text to put in its place')},
     ['path', 'old_text', 'new_text']),
    ('list_directory', 'List the files and directories under a directory, with their sizes, '
     'one entry per line, directories first.', {
         'directory': ('string', 'the directory to list, relative to the repository root'),
         'recursive': ('boolean', 'list the whole tree under the directory, not one level')},
     ['directory']),
    ('search_files', 'Find files whose names match a pattern.', {
         'pattern': ('string', 'a glob pattern such as *.py or test_*.py'),
         'directory': ('string', 'where to look; the repository root when omitted')},
     ['pattern']),
    ('grep', 'Search the contents of the files for a regular expression and return the '
     'matching lines with their file names and line numbers.', {
         'regex': ('string', 'a Python regular expression'),
         'directory': ('string', 'where to look; the repository root when omitted'),
         'include': ('string', 'a glob pattern of the files to search, such as *.py'),
         'ignore_case': ('boolean', 'match without regard to case')},
     ['regex']),
    ('run_command', 'Run a shell command in the repository root and return its exit status, '
     'standard output and standard error. Commands time out after ten minutes.', {
         'command': ('string', 'the command line, run with bash'),
         'timeout': ('integer', 'seconds before the command is stopped')},
     ['command']),
    ('run_tests', 'Run the test suite or a part of it with pytest and return the summary and '
     'the output of every failing test.', {
         'path': ('string', 'a test file, directory or node id; all tests when omitted'),
         'keyword': ('string', 'only tests whose names match this expression')},
     []),
    ('git_diff', 'Show the changes of the working tree against the last commit, or between '
     'two revisions.', {
         'revision': ('string', 'compare against this revision instead of HEAD'),
         'path': ('string', 'limit the diff to this path')},
     []),
    ('calculator', 'Evaluate an arithmetic expression.', {
         'expression': ('string', 'the expression, in Python syntax')},
     ['expression']),
    ('get_weather', 'Current weather in a city.', {
         'city': ('string', 'the name of the city'),
         'unit': ('string', 'celsius or fahrenheit')},
     ['city']),
    ('python', 'Run a short Python program in a fresh interpreter and return what it printed. '
     'The standard library is available; the network is not.', {
         'code': ('string', 'the program'),
         'timeout': ('integer', 'seconds before the program is stopped')},
     ['code']),
]


def tools() -> list[dict]:
    out = []
    for name, description, params, required in TOOLS:
        props = {k: {'type': t, 'description': d} for k, (t, d) in params.items()}
        out.append({'type': 'function', 'function': {
            'name': name, 'description': description,
            'parameters': {'type': 'object', 'properties': props, 'required': required}}})
    return out


SYSTEM_RULES = """You are a careful software engineering assistant working in a Python \
repository on behalf of the user. You can read and change files, search the code, run \
commands and run the tests through the tools you are given. Work in small steps: look at the \
code before you change it, make one change at a time, and run the tests after each change.

Rules:
1. Read a file before you edit it. Never guess the contents of a file you have not read.
2. Keep changes small and focused on the task. Do not reformat code you do not change, and do \
not rename things the task does not ask you to rename.
3. Follow the style of the surrounding code: its naming, its docstrings, its error messages \
and its imports. The code uses four spaces for indentation and lines of at most 100 \
characters.
4. When a test fails, read the failure and the code it points at before changing anything. \
Say what you think the cause is, then fix the cause, not the symptom.
5. Do not delete or skip tests to make a change pass. If a test is wrong, say why.
6. Never run commands that change anything outside the repository, and never push, publish \
or deploy anything.
7. When you are not sure what the user wants, ask one short question instead of guessing.
8. When the task is done, say in two or three sentences what you changed and how you checked \
it.

The repository is a small library for reading and writing configuration files. Its layout:
"""

MODULES = [
    ('config/parser.py', 'the parser of the INI-like format: sections, keys, values, '
     'comments and continuation lines', 'parse', 'text'),
    ('config/writer.py', 'writes a configuration back as text, keeping the order of sections '
     'and keys', 'write', 'config'),
    ('config/values.py', 'converts values to booleans, integers, floats, lists and durations',
     'convert', 'value'),
    ('config/interpolate.py', 'expands references to other keys and to environment variables '
     'inside values', 'expand', 'value'),
    ('config/schema.py', 'checks a configuration against a schema of required keys and types',
     'validate', 'config'),
    ('config/merge.py', 'merges several configurations, later ones taking precedence',
     'merge', 'configs'),
    ('config/errors.py', 'the exceptions, each with the file name and line number',
     'format_error', 'error'),
    ('config/cli.py', 'the command line tool: get, set, list, check and diff', 'main', 'argv'),
    ('tests/test_parser.py', 'tests of the parser, one per rule of the format', 'test_parse',
     'case'),
    ('tests/test_values.py', 'tests of the value conversions', 'test_convert', 'case'),
    ('tests/test_cli.py', 'tests of the command line tool through a temporary directory',
     'test_main', 'tmp_path'),
]

CODE = '''
Here is the start of config/parser.py, which most tasks touch:

```python
import dataclasses
import re

from config.errors import ParseError

SECTION = re.compile(r'^\\[(?P<name>[^\\]]+)\\]\\s*$')
KEY_VALUE = re.compile(r'^(?P<key>[^=:]+?)\\s*[=:]\\s*(?P<value>.*)$')
COMMENT_PREFIXES = ('#', ';')


@dataclasses.dataclass
class Section:
    name: str
    items: dict[str, str] = dataclasses.field(default_factory=dict)
    line: int = 0


def parse(text: str, filename: str = '<string>') -> dict[str, Section]:
    """Parses the text of a configuration file into its sections, in order."""
    sections: dict[str, Section] = {}
    current = None
    last_key = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line or line.lstrip().startswith(COMMENT_PREFIXES):
            continue
        if raw[:1].isspace() and current is not None and last_key is not None:
            current.items[last_key] += '\\n' + line.strip()
            continue
        match = SECTION.match(line)
        if match:
            name = match.group('name').strip()
            if name in sections:
                raise ParseError(f'section {name!r} is defined twice', filename, number)
            current = sections[name] = Section(name, line=number)
            last_key = None
            continue
        match = KEY_VALUE.match(line)
        if match is None:
            raise ParseError(f'expected a section or a key, got {line!r}', filename, number)
        if current is None:
            raise ParseError('a key before the first section', filename, number)
        key = match.group('key').strip().lower()
        if key in current.items:
            raise ParseError(f'key {key!r} is defined twice in [{current.name}]',
                             filename, number)
        current.items[key] = match.group('value').strip()
        last_key = key
    return sections


def get(sections: dict[str, Section], section: str, key: str, default=None):
    """The value of a key, or the default when the section or the key is missing."""
    found = sections.get(section)
    if found is None:
        return default
    return found.items.get(key.lower(), default)
```

'''


def system_prompt() -> str:
    layout = ''.join(f'- {path}: {what}; its main function is {fn}({arg}).\n'
                     for path, what, fn, arg in MODULES)
    return SYSTEM_RULES + layout + CODE


CITIES = ('Paris', 'London', 'Berlin', 'Madrid', 'Rome', 'Lisbon', 'Vienna', 'Prague')
ASKS = [
    'Read config/parser.py and tell me what happens with a key that has no value.',
    'What is the weather in {city}? I want to know if I can work outside.',
    'Calculate {a} * {b} + {c}.',
    'Find all test_*.py files in the tests directory.',
    'The parser accepts a key defined twice in different case. Is that a bug?',
    'Search for files matching *.md.',
    'How does to_duration handle the value 1.5h? Explain step by step.',
    'Run the tests in tests/test_values.py and tell me which ones fail.',
    'Add a to_int function to config/values.py that accepts 0x and 0o prefixes.',
    'What is {a} + {b} * {c}?',
    'Which files import config.errors? Use grep.',
    'Should I take an umbrella in {city}?',
]


def user_message(conv: int, turn: int) -> str:
    ask = ASKS[(conv * 5 + turn * 7) % len(ASKS)]
    return ask.format(city=CITIES[(conv + turn) % len(CITIES)], a=12 + conv * 7 + turn,
                      b=3 + turn, c=100 + conv)


def tool_result(name: str, arguments: str) -> str:
    """A canned, deterministic answer for any call."""
    return json.dumps({'tool': name, 'arguments': arguments[:200], 'status': 'ok',
                       'result': 'done: 3 lines of output, no errors'})


# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Turn:
    conv: int
    turn: int
    ttft: float  # s
    e2e: float  # s
    prompt_tokens: int
    cached_tokens: int | None  # None: the server reported no prompt_tokens_details
    completion_tokens: int


async def one_turn(client, model, messages, with_tools: bool = True
                   ) -> tuple[Turn, dict, list[dict]]:
    """Streams one chat completion; returns its figures, the assistant message and the tool
    messages answering its calls."""
    body = {'model': model, 'messages': messages, 'stream': True,
            'stream_options': {'include_usage': True}, 'temperature': 0.0,
            'max_tokens': _MAX_TOKENS.value,
            'chat_template_kwargs': {'enable_thinking': False}}
    if with_tools:
        body['tools'] = tools()
    start = time.perf_counter()
    first, content, calls, usage = None, '', {}, None
    async with client.stream('POST', '/v1/chat/completions', json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f'HTTP {r.status_code}: {(await r.aread()).decode()[:500]}')
        async for line in r.aiter_lines():
            if not line.startswith('data: ') or line == 'data: [DONE]':
                continue
            chunk = json.loads(line[6:])
            if 'error' in chunk:
                raise RuntimeError(f'stream error: {chunk["error"]}')
            usage = chunk.get('usage') or usage
            for choice in chunk.get('choices') or []:
                delta = choice.get('delta') or {}
                if first is None and (delta.get('content') or delta.get('reasoning_content')
                                      or delta.get('tool_calls')):
                    first = time.perf_counter()
                content += delta.get('content') or ''
                for c in delta.get('tool_calls') or []:
                    call = calls.setdefault(c['index'], {'id': None, 'name': '', 'args': ''})
                    call['id'] = c.get('id') or call['id']
                    fn = c.get('function') or {}
                    call['name'] += fn.get('name') or ''
                    call['args'] += fn.get('arguments') or ''
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError('the stream carried no usage (stream_options.include_usage)')
    details = usage.get('prompt_tokens_details')
    cached = details.get('cached_tokens') if isinstance(details, dict) else None
    turn = Turn(-1, -1, (first or end) - start, end - start, usage['prompt_tokens'], cached,
                usage['completion_tokens'])
    message = {'role': 'assistant', 'content': content}
    answers = []
    good = []
    for i, call in sorted(calls.items()):
        try:
            json.loads(call['args'] or '{}')
        except json.JSONDecodeError:  # keep the history renderable: the call becomes text
            message['content'] += f'\n{call["name"]}({call["args"]})'
            continue
        cid = call['id'] or f'call_{i}'
        good.append({'id': cid, 'type': 'function',
                     'function': {'name': call['name'], 'arguments': call['args'] or '{}'}})
        answers.append({'role': 'tool', 'tool_call_id': cid,
                        'content': tool_result(call['name'], call['args'])})
    if good:
        message['tool_calls'] = good
    return turn, message, answers


async def conversation(client, model, conv: int) -> list[Turn]:
    messages = [{'role': 'system', 'content': system_prompt()}]
    out = []
    for t in range(_TURNS.value):
        messages.append({'role': 'user', 'content': user_message(conv, t)})
        turn, answer, results = await one_turn(client, model, messages)
        turn.conv, turn.turn = conv, t
        out.append(turn)
        messages += [answer, *results]
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def replay(url: str, label: str) -> dict:
    import httpx
    headers = {'Authorization': f'Bearer {_KEY.value}'} if _KEY.value else {}
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers,
                                 limits=httpx.Limits(max_connections=64)) as client:
        model = _MODEL.value
        if not model:
            r = await client.get('/v1/models')
            r.raise_for_status()
            model = r.json()['data'][0]['id']
        # Warm-up: a short request without tools, so that it shares no full page with the
        # workload (the template puts the tools first).
        warm = [{'role': 'user', 'content': 'Hello! Say something short.'}]
        await one_turn(client, model, warm, with_tools=False)
        start = time.perf_counter()
        per_conv = await asyncio.gather(*[conversation(client, model, c)
                                          for c in range(_CONVERSATIONS.value)])
        wall = time.perf_counter() - start
    turns = [t for conv in per_conv for t in conv]
    ttft = [t.ttft * 1e3 for t in turns]
    prompt = sum(t.prompt_tokens for t in turns)
    reported = [t for t in turns if t.cached_tokens is not None]
    cached = sum(t.cached_tokens for t in reported)
    first = [t.prompt_tokens for t in turns if t.turn == 0]
    last = [t.prompt_tokens for t in turns if t.turn == _TURNS.value - 1]
    print(f'\n{label} ({url}, {model}): {len(per_conv)} conversations x {_TURNS.value} turns, '
          f'{len(turns)} requests in {wall:.2f} s')
    print(f'  prompt tokens: first turn {min(first)}-{max(first)}, last turn '
          f'{min(last)}-{max(last)}; {prompt} in all; '
          f'{sum(t.completion_tokens for t in turns)} completion tokens')
    print(f'  TTFT ms: median {statistics.median(ttft):9.1f}  p90 {pct(ttft, 0.9):9.1f}  '
          f'mean {statistics.mean(ttft):9.1f}  max {max(ttft):9.1f}')
    by_turn = [statistics.median(t.ttft * 1e3 for t in turns if t.turn == k)
               for k in range(_TURNS.value)]
    print('  TTFT median ms by turn: ' + ' '.join(f'{x:.0f}' for x in by_turn))
    share = cached / prompt if prompt else 0.0
    if len(reported) < len(turns):
        print(f'  cached tokens: NOT REPORTED in {len(turns) - len(reported)} of '
              f'{len(turns)} responses')
    print(f'  cached-token share: {cached} / {prompt} = {share:.1%}')
    first_cached = [t.cached_tokens for t in reported if t.turn == 0]
    if first_cached and min(first_cached) > 0:
        print(f'  NOTE: every first turn found {min(first_cached)}+ tokens cached: the server '
              'had seen this system prompt before (not a fresh server?)')
    return {'label': label, 'ttft_median_ms': statistics.median(ttft),
            'ttft_p90_ms': pct(ttft, 0.9), 'wall_s': wall, 'cached_share': share}


async def main_async():
    if bool(_URL_ON.value) != bool(_URL_OFF.value):
        raise app.UsageError('--url_on and --url_off go together')
    if _URL_ON.value:
        off = await replay(_URL_OFF.value, 'prefix caching off')
        on = await replay(_URL_ON.value, 'prefix caching on')
        print(f'\nmedian TTFT off / on: {off["ttft_median_ms"] / on["ttft_median_ms"]:.1f}x '
              f'(goal >= 5x); p90 {off["ttft_p90_ms"] / on["ttft_p90_ms"]:.1f}x; '
              f'wall time {off["wall_s"] / on["wall_s"]:.1f}x')
    else:
        await replay(_URL.value, _LABEL.value or 'server')


def main(argv):
    del argv
    logging.getLogger('httpx').setLevel(logging.WARNING)  # a line per request otherwise
    asyncio.run(main_async())


if __name__ == '__main__':
    app.run(main)
