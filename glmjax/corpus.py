"""The training corpus of the demo model, built from text every machine has.

Three kinds of documents:
- code: the Python standard library's own source files (docstrings included);
- chat: for each documented function of those files, a GLM-4.6 chat (rendered with the
  chat template) where the user asks for what the docstring describes and the assistant
  answers with the function's code; some with a `<think>` block, some with thinking off;
- tools: synthetic tool-use conversations over three tools (get_weather, calculator,
  search_files): a request, a `<tool_call>` in GLM's XML argument format, the
  `<|observation|>` with the tool's response, and the answer.

Held-out files (a fixed ~5% of the stdlib files, chosen by a hash of their path, so the same
on every machine with the same Python) never reach the training data; the evaluation reads
their code, their function signatures, and tool prompts made from held-out cities, patterns
and phrasings.

The BPE tokenizer (`tokenizers`, byte-level) is trained on the same training text and carries
GLM's special tokens by name: the ids differ from GLM-4.6's, the format is the same.
"""

import ast
import dataclasses
import hashlib
import json
import os
import random
import sysconfig
import textwrap

import numpy as np

# Marked special, as in GLM-4.6's tokenizer.json (the random test model's tokenizer too).
SPECIAL_TOKENS = ('<|endoftext|>', '[MASK]', '[gMASK]', '[sMASK]', '<sop>', '<eop>',
                  '<|system|>', '<|user|>', '<|assistant|>', '<|observation|>',
                  '<|begin_of_image|>', '<|end_of_image|>')
# Not special in GLM-4.6 (they survive decoding): reasoning and tool-call tags.
TAG_TOKENS = ('<think>', '</think>', '<tool_call>', '</tool_call>', '<tool_response>',
              '</tool_response>', '<arg_key>', '</arg_key>', '<arg_value>', '</arg_value>',
              '/nothink')
# A turn ends at any of these (GLM-4.6's generation_config eos ids, by name).
EOS_TOKENS = ('<|endoftext|>', '<|user|>', '<|observation|>')
EOT = '<|endoftext|>'
HELD_OUT_PERCENT = 5
SKIP_DIRS = {'test', 'tests', 'site-packages', '__pycache__', 'idlelib', 'turtledemo',
             'lib-dynload', 'ensurepip', 'pydoc_data', 'lib2to3'}
MAX_FILE_CHARS = 200_000


# ----------------------------------------------------------------------------------------
# The standard library and its documented functions.


def stdlib_root() -> str:
    return sysconfig.get_paths()['stdlib']


def is_held_out(relpath: str) -> bool:
    """A fixed choice by path, independent of any seed."""
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:4], 'little') % 100 < HELD_OUT_PERCENT


def stdlib_files(root: str | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """(path relative to the stdlib, text) of its .py files, sorted by path."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.startswith('config-'))
        for name in sorted(filenames):
            if not name.endswith('.py') or name.startswith('_sysconfigdata'):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding='utf-8') as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if 0 < len(text) <= MAX_FILE_CHARS:
                out.append((os.path.relpath(path, root), text))
    out.sort()
    return out[:limit] if limit else out


@dataclasses.dataclass(frozen=True)
class Function:
    module: str
    name: str
    signature: str  # the `def ...:` line(s), dedented
    doc: str  # the docstring's first paragraph, on one line
    body: str  # the whole function, dedented, docstring included
    indent: int = 0  # its column in the file (4 for a method)


def module_name(relpath: str) -> str:
    name = relpath[:-3].replace(os.sep, '.')
    return name.removesuffix('.__init__')


def functions(relpath: str, text: str, max_chars: int = 1200) -> list[Function]:
    """The documented functions and methods of one file whose code is not too long."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith('__') or node.decorator_list:
            continue
        para = ' '.join(doc.split('\n\n')[0].split())
        if not 20 <= len(para) <= 300:
            continue
        source = textwrap.dedent(''.join(lines[node.lineno - 1:node.end_lineno]))
        body_start = node.body[0].lineno - node.lineno
        signature = ''.join(source.splitlines(keepends=True)[:body_start]).rstrip()
        if len(source) <= max_chars and signature.startswith(('def ', 'async def ')):
            out.append(Function(module_name(relpath), node.name, signature, para, source,
                                node.col_offset))
    return out


# ----------------------------------------------------------------------------------------
# Chat template (serving's, wherever the package lives now).


def _chat_module():
    try:
        from glmjax.serving import chat
    except ImportError:
        from serving import chat
    return chat


def chat_template_path() -> str:
    return _chat_module().DEFAULT_TEMPLATE


def chat_template():
    with open(chat_template_path()) as f:
        return _chat_module().ChatTemplate(f.read())


def _parser_module():
    try:
        from glmjax.serving import glm_parser
    except ImportError:
        from serving import glm_parser
    return glm_parser


# ----------------------------------------------------------------------------------------
# Chats from docstrings.

ASKS = (
    'Write a Python function `{sig}` that does this: {doc}',
    'Implement `{name}` from the `{module}` module. {doc}',
    '{doc}\nShow me the code of `{name}`.',
    'How is `{module}.{name}` written? Its docstring says: {doc}',
    'Please write `{name}` in Python. It should do the following: {doc}',
)


def _sig_line(fn: Function) -> str:
    return ' '.join(fn.signature.split()).removesuffix(':')


def function_chat(fn: Function, rng: random.Random) -> tuple[list[dict], bool]:
    """(messages, thinking) for one function."""
    ask = rng.choice(ASKS).format(sig=_sig_line(fn).removeprefix('def '), name=fn.name,
                                  module=fn.module, doc=fn.doc)
    answer = (f'Here is `{fn.name}` from `{fn.module}`:\n```python\n{fn.body.rstrip()}\n```')
    mode = rng.random()
    reasoning = ''
    if mode < 0.4:
        first = fn.doc.split('. ')[0].rstrip('.')
        reasoning = (f'The user wants `{fn.name}`. {first}. '
                     f'I will write it as in `{fn.module}`, with its docstring.')
    messages = [{'role': 'user', 'content': ask},
                {'role': 'assistant', 'content': answer, 'reasoning_content': reasoning}]
    return messages, mode < 0.8  # the rest with thinking off (/nothink, empty think)


# ----------------------------------------------------------------------------------------
# Tool-use conversations.

TOOLS = [
    {'type': 'function', 'function': {
        'name': 'get_weather', 'description': 'Current weather in a city.',
        'parameters': {'type': 'object', 'properties': {
            'city': {'type': 'string'},
            'unit': {'type': 'string', 'enum': ['celsius', 'fahrenheit']}},
            'required': ['city']}}},
    {'type': 'function', 'function': {
        'name': 'calculator', 'description': 'Evaluate an arithmetic expression.',
        'parameters': {'type': 'object', 'properties': {'expression': {'type': 'string'}},
                       'required': ['expression']}}},
    {'type': 'function', 'function': {
        'name': 'search_files', 'description': 'Find files whose names match a pattern.',
        'parameters': {'type': 'object', 'properties': {
            'pattern': {'type': 'string'}, 'directory': {'type': 'string'}},
            'required': ['pattern']}}},
]

CITIES = tuple((
    'Paris, London, Berlin, Madrid, Rome, Lisbon, Vienna, Prague, Warsaw, Budapest, Athens, '
    'Dublin, Oslo, Stockholm, Helsinki, Copenhagen, Amsterdam, Brussels, Zurich, Geneva, '
    'Munich, Hamburg, Milan, Naples, Porto, Seville, Valencia, Lyon, Marseille, Nice, Krakow, '
    'Sofia, Bucharest, Belgrade, Zagreb, Riga, Tallinn, Vilnius, Kyiv, Istanbul, Ankara, '
    'Cairo, Lagos, Nairobi, Accra, Dakar, Tunis, Casablanca, Johannesburg, Cape Town, Durban, '
    'Tokyo, Osaka, Kyoto, Seoul, Busan, Beijing, Shanghai, Shenzhen, Chengdu, Wuhan, '
    'Hangzhou, Taipei, Manila, Jakarta, Bangkok, Hanoi, Singapore, Mumbai, Delhi, Chennai, '
    'Kolkata, Karachi, Lahore, Dhaka, Tehran, Dubai, Doha, Riyadh, Baghdad, Toronto, '
    'Montreal, Vancouver, Chicago, Boston, Seattle, Denver, Austin, Houston, Dallas, Miami, '
    'Atlanta, Phoenix, Portland, Detroit, Mexico City, Lima, Bogota, Quito, Santiago, '
    'Buenos Aires, Caracas, Havana, Sydney, Melbourne, Brisbane, Perth, Auckland, Wellington, '
    'Reykjavik, Edinburgh, Glasgow, Cardiff, Belfast, Bristol, Leeds, Manchester, Liverpool, '
    'Bordeaux, Toulouse, Strasbourg, Bologna, Florence, Turin, Genoa, Palermo, Salzburg, '
    'Graz, Bern, Basel, Antwerp, Ghent, Rotterdam, Utrecht').split(', '))
PATTERNS = ('*.py', '*.txt', '*.md', '*.json', '*.csv', '*.toml', '*.yaml', '*.log', '*.cfg',
            '*.ini', '*.html', '*.css', '*.js', '*.rs', '*.go', '*.c', '*.h', 'test_*.py',
            'README*', '*.sh', '*.sql', '*.xml', '*.png', '*.jpg', 'setup.*', '*.ipynb',
            'Makefile', '*.lock', '*_test.go', '*.proto')
DIRS = ('src', 'docs', 'tests', 'lib', 'data', 'scripts', 'build', 'config', 'notes',
        'assets', 'tools', 'examples', 'bin', 'web', 'reports', 'logs', 'home', 'project')
CONDITIONS = ('sunny', 'cloudy', 'rainy', 'windy', 'snowy', 'foggy', 'clear', 'stormy')

WEATHER_ASKS = (
    "What's the weather in {city}?", 'How is the weather in {city} today?',
    'Is it cold in {city} right now?', 'Tell me the current weather for {city}.',
    'weather {city}', 'Should I take an umbrella in {city}?',
    'What is the temperature in {city} in {unit}?', 'Weather in {city}, in {unit} please.',
    'How warm is it in {city}? Use {unit}.', 'Give me the {unit} temperature in {city}.',
)
CALC_ASKS = (
    'What is {expr}?', 'Calculate {expr}.', 'Compute {expr} for me.', '{expr} = ?',
    'Can you work out {expr}?', 'Please evaluate {expr}.', 'How much is {expr}?',
)
SEARCH_ASKS = (
    'Find all {pattern} files.', 'Search for files matching {pattern}.',
    'Which files match {pattern}?', 'List the {pattern} files in {dir}.',
    'Find {pattern} in the {dir} directory.', 'Look for {pattern} files under {dir}.',
    'Are there any {pattern} files in {dir}?',
)
CHITCHAT = (
    ('Hello!', 'Hello! I can check the weather, do arithmetic, or search for files.'),
    ('Thanks, that is all.', 'You are welcome!'),
    ('Who are you?', 'I am a small GLM-4.6-shaped demo model trained by glmjax.'),
    ('What can you do?', 'I can call three tools: get_weather, calculator and search_files.'),
    ('Good morning', 'Good morning! How can I help?'),
)
# Held out of training: these phrasings, and every fifth city and pattern.
HELD_OUT_ASKS = {WEATHER_ASKS[-1], WEATHER_ASKS[3], CALC_ASKS[-1], SEARCH_ASKS[-1]}


def _held(pool, held: bool):
    return tuple(x for i, x in enumerate(pool) if (i % 5 == 4) == held)


def _expression(rng: random.Random) -> str:
    """An arithmetic expression of a few integers."""
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 50)
    form = rng.randrange(5)
    return (f'{a} + {b}', f'{a} * {b}', f'{a} - {b} * {c}', f'({a} + {b}) * {c}',
            f'{a} / {b}')[form]


@dataclasses.dataclass(frozen=True)
class ToolPrompt:
    """One request: the user's text and the call a correct answer makes."""
    user: str
    name: str
    arguments: dict


def tool_prompt(rng: random.Random, held: bool = False) -> ToolPrompt:
    kind = rng.randrange(3)
    asks = {0: WEATHER_ASKS, 1: CALC_ASKS, 2: SEARCH_ASKS}[kind]
    asks = tuple(a for a in asks if (a in HELD_OUT_ASKS) == held) or asks
    ask = rng.choice(asks)
    if kind == 0:
        city, unit = rng.choice(_held(CITIES, held)), rng.choice(('celsius', 'fahrenheit'))
        args = {'city': city, 'unit': unit} if '{unit}' in ask else {'city': city}
        return ToolPrompt(ask.format(city=city, unit=unit), 'get_weather', args)
    if kind == 1:
        expr = _expression(rng)
        return ToolPrompt(ask.format(expr=expr), 'calculator', {'expression': expr})
    pattern, directory = rng.choice(_held(PATTERNS, held)), rng.choice(DIRS)
    args = {'pattern': pattern, 'directory': directory} if '{dir}' in ask else {'pattern': pattern}
    return ToolPrompt(ask.format(pattern=pattern, dir=directory), 'search_files', args)


def tool_result(prompt: ToolPrompt, rng: random.Random) -> tuple[dict, str]:
    """The tool's response (as JSON) and the assistant's answer from it."""
    args = prompt.arguments
    if prompt.name == 'get_weather':
        unit = args.get('unit', 'celsius')
        temp = rng.randint(-10, 35) if unit == 'celsius' else rng.randint(14, 95)
        cond = rng.choice(CONDITIONS)
        mark = '°C' if unit == 'celsius' else '°F'
        return ({'city': args['city'], 'temperature': temp, 'unit': unit, 'condition': cond},
                f'It is {temp}{mark} and {cond} in {args["city"]}.')
    if prompt.name == 'calculator':
        value = _eval(args['expression'])
        return {'result': json.loads(value)}, f'{args["expression"]} = {value}.'
    directory = args.get('directory', '.')
    stem = rng.choice(('main', 'utils', 'notes', 'config', 'data', 'app', 'index', 'report'))
    found = [f'{directory}/{stem}{i or ""}{args["pattern"].lstrip("*")}'
             for i in range(rng.randint(0, 3))]
    if not found:
        return {'matches': []}, f'No files match {args["pattern"]} in {directory}.'
    return ({'matches': found},
            f'I found {len(found)} file{"s" * (len(found) > 1)}: {", ".join(found)}.')


def _eval(expr: str) -> str:
    """The calculator: expressions of digits and + - * / ( ) only, as built here."""
    value = eval(expr, {'__builtins__': {}})
    return f'{value:.4g}' if isinstance(value, float) else str(value)


def _reasoning(prompt: ToolPrompt) -> str:
    what = {'get_weather': 'the weather in {city}', 'calculator': 'the value of {expression}',
            'search_files': 'files matching {pattern}'}[prompt.name]
    return f'The user wants {what.format(**prompt.arguments)}. I will call {prompt.name}.'


def tool_conversation(rng: random.Random, held: bool = False) -> tuple[list[dict], bool]:
    """(messages, thinking): request, call, observation, answer; sometimes small talk."""
    if not held and rng.random() < 0.08:  # small talk is never held out
        user, answer = rng.choice(CHITCHAT)
        return ([{'role': 'user', 'content': user},
                 {'role': 'assistant', 'content': answer}], rng.random() < 0.5)
    prompt = tool_prompt(rng, held)
    thinking = rng.random() < 0.6
    response, answer = tool_result(prompt, rng)
    call = {'type': 'function', 'function': {'name': prompt.name,
                                             'arguments': prompt.arguments}}
    return ([{'role': 'user', 'content': prompt.user},
             {'role': 'assistant', 'content': '', 'tool_calls': [call],
              'reasoning_content': _reasoning(prompt) if thinking else ''},
             {'role': 'tool', 'content': json.dumps(response, ensure_ascii=False)},
             {'role': 'assistant', 'content': answer}], thinking)


def render(template, messages: list[dict], thinking: bool, tools=None) -> str:
    """A whole conversation as training text: the template, then `<|user|>` to end the
    last assistant turn the way GLM does (it is an eos token)."""
    kwargs = {} if thinking else {'enable_thinking': False}
    return template.render(messages, tools=tools, add_generation_prompt=False,
                           **kwargs) + '<|user|>'


# ----------------------------------------------------------------------------------------
# Validation of tool calls against the tools' schemas.


def schema_errors(name: str, arguments: dict, tools=TOOLS) -> list[str]:
    """What is wrong with a call (unknown tool, missing, unknown or mistyped arguments)."""
    by_name = {t['function']['name']: t['function']['parameters'] for t in tools}
    if name not in by_name:
        return [f'unknown tool {name!r}']
    schema, errors = by_name[name], []
    if not isinstance(arguments, dict):
        return ['arguments are not an object']
    for key in schema.get('required', []):
        if key not in arguments:
            errors.append(f'missing {key}')
    types = {'string': str, 'number': (int, float), 'integer': int, 'boolean': bool}
    for key, value in arguments.items():
        prop = schema['properties'].get(key)
        if prop is None:
            errors.append(f'unknown argument {key}')
        elif not isinstance(value, types[prop['type']]):
            errors.append(f'{key} is not a {prop["type"]}')
        elif 'enum' in prop and value not in prop['enum']:
            errors.append(f'{key}={value!r} not in {prop["enum"]}')
    return errors


# ----------------------------------------------------------------------------------------
# Tokenizer.


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE of `vocab_size` ids in all, GLM's special tokens and tags included."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS), show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


# ----------------------------------------------------------------------------------------
# The corpus as token arrays.


@dataclasses.dataclass
class Corpus:
    """Token arrays (int32): `code` one stream of the training files, each ending in
    <|endoftext|>; `docs`/`doc_offsets` the chat and tool documents, each whole;
    `held_code` the held-out files' stream. `eval` holds the held-out prompts."""
    code: np.ndarray
    docs: np.ndarray
    doc_offsets: np.ndarray  # [n_docs + 1]
    held_code: np.ndarray
    eval: dict
    meta: dict

    def save(self, path: str):
        os.makedirs(path, exist_ok=True)
        np.savez(os.path.join(path, 'tokens.npz'), code=self.code, docs=self.docs,
                 doc_offsets=self.doc_offsets, held_code=self.held_code)
        with open(os.path.join(path, 'eval.json'), 'w') as f:
            json.dump({'eval': self.eval, 'meta': self.meta}, f, indent=1)

    @classmethod
    def load(cls, path: str) -> 'Corpus':
        with np.load(os.path.join(path, 'tokens.npz')) as z:
            arrays = {k: z[k] for k in z.files}
        with open(os.path.join(path, 'eval.json')) as f:
            rest = json.load(f)
        return cls(**arrays, eval=rest['eval'], meta=rest['meta'])

    def doc(self, i: int) -> np.ndarray:
        return self.docs[self.doc_offsets[i]:self.doc_offsets[i + 1]]


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    vocab_size: int = 4096
    tool_conversations: int = 5000
    max_files: int | None = None  # for tests: the first N stdlib files
    eval_tool_prompts: int = 100
    eval_signatures: int = 60
    seed: int = 0


def _stream(tok, texts: list[str]) -> np.ndarray:
    """The texts' tokens end to end, each text ending in <|endoftext|>."""
    eot = tok.token_to_id(EOT)
    ids = [e.ids + [eot] for e in tok.encode_batch(texts, add_special_tokens=False)]
    return np.asarray([i for x in ids for i in x], np.int32)


def _documents(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as one int32 array and their offsets [n + 1]."""
    return (np.asarray([i for d in docs for i in d], np.int32),
            np.cumsum([0] + [len(d) for d in docs]).astype(np.int64))


def build(cc: CorpusConfig, tokenizer_out: str | None = None, log=print):
    """Builds the corpus and its tokenizer. Returns (Corpus, tokenizers.Tokenizer)."""
    rng = random.Random(cc.seed)
    files = stdlib_files(limit=cc.max_files)
    train_files = [(p, t) for p, t in files if not is_held_out(p)]
    held_files = [(p, t) for p, t in files if is_held_out(p)]
    template = chat_template()
    chats = []
    for path, text in train_files:
        for fn in functions(path, text):
            messages, thinking = function_chat(fn, rng)
            chats.append(render(template, messages, thinking))
    tools = []
    for _ in range(cc.tool_conversations):
        messages, thinking = tool_conversation(rng)
        tools.append(render(template, messages, thinking, tools=TOOLS))
    log(f'corpus: {len(train_files)} training files, {len(held_files)} held out, '
        f'{len(chats)} docstring chats, {len(tools)} tool conversations')
    code_texts = [t for _, t in train_files]
    tok = train_tokenizer(code_texts + chats + tools[:2000], cc.vocab_size)
    if tokenizer_out:
        tok.save(tokenizer_out)
    docs = [e.ids for e in tok.encode_batch(chats + tools, add_special_tokens=False)]
    order = list(range(len(docs)))
    rng.shuffle(order)
    docs, offsets = _documents([docs[i] for i in order])
    eval_rng = random.Random(cc.seed + 1)
    prompts = [dataclasses.asdict(tool_prompt(eval_rng, held=True))
               for _ in range(cc.eval_tool_prompts)]
    sigs = [dataclasses.asdict(fn) for p, t in held_files for fn in functions(p, t)]
    eval_rng.shuffle(sigs)
    corpus = Corpus(code=_stream(tok, code_texts), docs=docs, doc_offsets=offsets,
                    held_code=_stream(tok, [t for _, t in held_files]),
                    eval={'tool_prompts': prompts, 'signatures': sigs[:cc.eval_signatures],
                          'held_files': [p for p, _ in held_files],
                          'train_files': [p for p, _ in train_files]},
                    meta={'config': dataclasses.asdict(cc), 'stdlib': stdlib_root(),
                          'n_chats': len(chats), 'n_tools': len(tools)})
    log(f'corpus: {len(corpus.code):,} code tokens, {len(corpus.docs):,} chat/tool tokens, '
        f'{len(corpus.held_code):,} held-out tokens')
    return corpus, tok


def pack(corpus: Corpus, seq_len: int, seed: int, doc_fraction: float = 0.6) -> np.ndarray:
    """Training rows [N, seq_len + 1], one pass over the corpus: each row takes whole
    chat/tool documents (shuffled by the seed) up to about `doc_fraction` of its length and
    is filled with the next piece of the code stream; when either source runs out, the rows
    are of the other. A document longer than a row is left out."""
    L = seq_len + 1
    rng = np.random.default_rng(seed)
    n = len(corpus.doc_offsets) - 1
    order = [i for i in rng.permutation(n)
             if corpus.doc_offsets[i + 1] - corpus.doc_offsets[i] <= L]
    code, at = corpus.code, int(rng.integers(len(corpus.code)))
    rows, i, used = [], 0, 0
    while i < len(order) or used < len(code):
        row = []
        while i < len(order) and (len(row) < doc_fraction * L or used >= len(code)):
            d = corpus.doc(order[i])
            if len(row) + len(d) > L:
                break
            row.extend(d.tolist())
            i += 1
        need = L - len(row)
        piece = np.take(code, np.arange(at, at + need), mode='wrap')
        at, used = (at + need) % len(code), used + need
        rows.append(np.concatenate([np.asarray(row, np.int32), piece]))
    return np.stack(rows)


def heldout_mix(tokenizer, held_files: list[str], tool_conversations: int = 600,
                seed: int = 7) -> Corpus:
    """The held-out text in the training mix, for `pack`: the code stream of `held_files`
    (a corpus's `eval['held_files']`), and as documents chats made from their functions and
    tool conversations with the held-out cities, patterns and asks. The router's bias
    balances the mix it is trained on; code alone is another distribution."""
    rng, template = random.Random(seed), chat_template()
    files = [(p, t) for p, t in stdlib_files() if p in set(held_files)]
    if len(files) != len(held_files):
        missing = sorted(set(held_files) - {p for p, _ in files})
        raise ValueError(f'held-out files missing from this Python\'s standard library '
                         f'({stdlib_root()}): {missing[:5]}')
    texts = [render(template, *function_chat(fn, rng)) for p, t in files
             for fn in functions(p, t)]
    for _ in range(tool_conversations):
        messages, thinking = tool_conversation(rng, held=True)
        texts.append(render(template, messages, thinking, tools=TOOLS))
    rng.shuffle(texts)
    code = _stream(tokenizer, [t for _, t in files])
    docs, offsets = _documents([e.ids for e in tokenizer.encode_batch(
        texts, add_special_tokens=False)])
    return Corpus(code=code, docs=docs, doc_offsets=offsets, held_code=code, eval={}, meta={})


def rows_of(stream: np.ndarray, seq_len: int, max_rows: int | None = None) -> np.ndarray:
    """A token stream cut into rows [N, seq_len + 1] (evaluation)."""
    L = seq_len + 1
    n = len(stream) // L if max_rows is None else min(len(stream) // L, max_rows)
    return stream[:n * L].reshape(n, L)
