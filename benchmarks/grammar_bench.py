"""xgrammar and llguidance side by side on a vocabulary of GLM-4.6's size (151,552 tokens):
JSON-schema compile time and the time to fill one token bitmask, per schema.

  .venv/bin/pip install xgrammar==0.2.8   # not a glmjax dependency: it pulls torch and triton
  .venv/bin/python benchmarks/grammar_bench.py

GLM's own tokenizer is not available offline, so the vocabulary is synthetic, built to have
the same size and a similar make-up (a byte-level BPE vocabulary, GPT-2 byte alphabet, as
GLM's is), deterministically from a seed:
  - the 256 single bytes; every regular token of the demo model's 4K BPE (English and Python
    pieces, whitespace runs, JSON punctuation such as `{"` and `",`);
  - every 1-3 digit string (GLM's pre-tokenizer splits numbers into groups of up to three);
  - whitespace runs: spaces, tabs, newlines, and newline + indentation, up to 80 wide;
  - punctuation: every pair and a sample of triples of code/JSON punctuation, bare and after
    a space;
  - words from a syllable generator (lower, Capitalised and UPPER, bare and after a space),
    snake_case identifiers, accented Latin, Cyrillic and Greek words;
  - CJK: one to three ideographs, bare and after a space (GLM is bilingual: about a fifth of
    its vocabulary is Chinese);
  - GLM's special tokens at their real ids (151329 `<|endoftext|>` .. 151360 `/nothink`), the
    rest of ids up to 151551 reserved specials, as in GLM's tokenizer.
Every token's prefixes are tokens too (as a BPE vocabulary's mostly are), which makes the
token trie as dense near its root as a real one. No merges: text is tokenized by the longest
token first within GPT-2 pre-tokens (close to BPE's result); that tokenizes each schema's
valid JSON document (the same ids for both libraries) and, natively through `tokenizers`,
gives llguidance the canonical tokens of the text a grammar forces.

Compile is the first request's cost for a new schema: xgrammar builds its whole per-state
token-mask cache ahead of time; llguidance builds its lexer lazily, so its first masks are
slower than the later ones (reported separately as `first`). Mask fill times are the host
time of one `fill` call per generated token, mean and p99 over the document.
"""

import json
import random
import statistics
import time
from importlib.metadata import version

import numpy as np

GLM_VOCAB = 151552
GLM_SPECIAL_START = 151329
GLM_SPECIALS = {  # id -> text: GLM-4.6's special tokens (the rest are reserved slots)
    151329: '<|endoftext|>', 151330: '[MASK]', 151331: '[gMASK]', 151332: '[sMASK]',
    151333: '<sop>', 151334: '<eop>', 151335: '<|system|>', 151336: '<|user|>',
    151337: '<|assistant|>', 151338: '<|observation|>', 151339: '<|begin_of_image|>',
    151340: '<|end_of_image|>', 151350: '<think>', 151351: '</think>', 151352: '<tool_call>',
    151353: '</tool_call>', 151354: '<tool_response>', 151355: '</tool_response>',
    151356: '<arg_key>', 151357: '</arg_key>', 151358: '<arg_value>', 151359: '</arg_value>',
    151360: '/nothink',
}
GLM_EOS = [151329, 151336, 151338]
DEMO_TOKENIZER = 'glmjax/demo_model/tokenizer.json'


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies use."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(0xA1, 0xAD))
                 + list(range(0xAE, 0x100)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTES = _byte_alphabet()


def _encode(text: str) -> str:
    return ''.join(_BYTES[b] for b in text.encode())


def _words(rng: random.Random, n: int) -> list[str]:
    onsets = ['', 'b', 'c', 'd', 'f', 'g', 'h', 'j', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v',
              'w', 'z', 'bl', 'br', 'ch', 'cl', 'cr', 'dr', 'fl', 'fr', 'gr', 'pl', 'pr', 'sh',
              'sl', 'sp', 'st', 'str', 'th', 'tr', 'wh']
    vowels = ['a', 'e', 'i', 'o', 'u', 'ai', 'ea', 'ee', 'io', 'ou', 'y']
    codas = ['', '', 'n', 'r', 's', 't', 'l', 'm', 'nd', 'ng', 'nt', 'st', 'ck', 'rt', 'ss', 'x']
    out = set()
    while len(out) < n:
        out.add(''.join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                        for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4]))))
    return sorted(out)


def synthetic_vocab(seed: int = 0) -> list[str]:
    """Byte-level token strings, index = id, GLM_VOCAB of them (see the module docstring)."""
    rng = random.Random(seed)
    with open(DEMO_TOKENIZER) as f:
        demo = json.load(f)
    added = {t['content'] for t in demo['added_tokens']}
    pieces: list[str] = []
    seen: set[str] = set()

    def add(piece: str):  # with its prefixes
        for k in range(1, len(piece) + 1):
            if piece[:k] not in seen and len(pieces) < GLM_SPECIAL_START:
                seen.add(piece[:k])
                pieces.append(piece[:k])

    for piece in [_BYTES[b] for b in range(256)] + sorted(demo['model']['vocab'],
                                                         key=demo['model']['vocab'].get):
        if piece not in added:
            add(piece)
    fixed = [str(i) for i in range(10)] + [f'{i:02d}' for i in range(100)]
    fixed += [f'{i:03d}' for i in range(1000)]
    for k in range(1, 81):
        fixed += [' ' * k, '\n' + ' ' * k]
    for k in range(1, 11):
        fixed += ['\n' * k, '\t' * k, '\n' + '\t' * k, '\r\n' * k, '\n\n' + ' ' * (4 * k)]
    punct = '{}[]()":,.;\'-_=+*/\\<>!?#@$%^&|~`'
    pairs = [a + b for a in punct for b in punct]
    triples = rng.sample([a + b + c for a in punct for b in punct for c in punct], 6000)
    fixed += pairs + [' ' + p for p in pairs] + triples + [' ' + t for t in triples[:2000]]
    words = _words(rng, 30000)
    raw = []
    for w in words:
        raw += [w, ' ' + w, w.capitalize(), ' ' + w.capitalize()]
    raw += [w.upper() for w in words[:4000]] + [' ' + w.upper() for w in words[:2000]]
    raw += ['_'.join(rng.sample(words, rng.choice([2, 3]))) for _ in range(8000)]
    accents = 'áàâäãåçéèêëíìîïñóòôöõúùûüýÿßøæœ'
    cyrillic = 'абвгдежзийклмнопрстуфхцчшщъыьэюя'
    greek = 'αβγδεζηθικλμνξοπρστυφχψω'
    for alphabet in (accents + 'abcdefghijklmnopqrstuvwxyz', cyrillic, greek):
        for _ in range(2500):
            w = ''.join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
            raw += [w, ' ' + w]
    for _ in range(60000):  # CJK: one to three ideographs
        w = ''.join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.choice([1, 1, 2, 2, 3])))
        raw.append(w if rng.random() < 0.85 else ' ' + w)
    rng.shuffle(raw)  # the vocabulary fills up before the list ends: a fair share of each
    for text in fixed + raw:
        add(_encode(text))
    assert len(pieces) == GLM_SPECIAL_START, len(pieces)
    pieces += [GLM_SPECIALS.get(i, f'<|reserved_special_token_{i - GLM_SPECIAL_START}|>')
               for i in range(GLM_SPECIAL_START, GLM_VOCAB)]
    return pieces


def hf_tokenizer(pieces: list[str]):
    """The vocabulary as a Hugging Face tokenizer: byte-level, GPT-2 pre-tokenization, then
    the longest token first (WordPiece without a continuation prefix)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    regular = {p: i for i, p in enumerate(pieces[:GLM_SPECIAL_START])}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab=regular, unk_token=pieces[0],
                                                continuing_subword_prefix='',
                                                max_input_chars_per_word=1 << 20))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(pieces[GLM_SPECIAL_START:])
    return tok


SCHEMAS = {
    'nested objects': {
        'type': 'object', 'additionalProperties': False, 'required': ['user', 'meta'],
        'properties': {
            'user': {'type': 'object', 'additionalProperties': False,
                     'required': ['name', 'address'],
                     'properties': {
                         'name': {'type': 'string'},
                         'address': {'type': 'object', 'additionalProperties': False,
                                     'required': ['city', 'zip'],
                                     'properties': {'city': {'type': 'string'},
                                                    'zip': {'type': 'string'}}}}},
            'meta': {'type': 'object', 'additionalProperties': False, 'required': ['source'],
                     'properties': {'source': {'type': 'string'}}}}},
    'arrays of items': {
        'type': 'object', 'additionalProperties': False, 'required': ['items'],
        'properties': {'items': {'type': 'array', 'minItems': 1, 'items': {
            'type': 'object', 'additionalProperties': False, 'required': ['sku', 'qty'],
            'properties': {'sku': {'type': 'string'}, 'qty': {'type': 'integer'},
                           'tags': {'type': 'array', 'items': {'type': 'string'}}}}}}},
    'enums': {
        'type': 'object', 'additionalProperties': False, 'required': ['color', 'size', 'mode'],
        'properties': {'color': {'enum': ['red', 'green', 'blue']},
                       'size': {'type': 'string', 'enum': ['small', 'medium', 'large']},
                       'mode': {'enum': [1, 2, 'auto', None]}}},
    'required+optional': {
        'type': 'object', 'additionalProperties': False, 'required': ['id', 'title'],
        'properties': {'id': {'type': 'integer'}, 'title': {'type': 'string'},
                       'summary': {'type': 'string'}, 'author': {'type': 'string'},
                       'year': {'type': 'integer'}}},
    'numbers+booleans': {
        'type': 'object', 'additionalProperties': False,
        'required': ['price', 'count', 'in_stock', 'ratio'],
        'properties': {'price': {'type': 'number', 'minimum': 0},
                       'count': {'type': 'integer', 'minimum': 0, 'maximum': 1000},
                       'in_stock': {'type': 'boolean'}, 'ratio': {'type': 'number'},
                       'flags': {'type': 'array', 'items': {'type': 'boolean'}}}},
}

DOCUMENTS = {  # a valid document per schema, written as a model would (spaces after : and ,)
    'nested objects': {'user': {'name': 'Ada Lovelace, Countess of Lovelace',
                                'address': {'city': 'London 北京 Москва', 'zip': 'W1J 7NT'}},
                       'meta': {'source': 'The analytical engine notes, 1843 edition'}},
    'arrays of items': {'items': [{'sku': f'SKU-{i:04d}-blue', 'qty': i * 7,
                                   'tags': ['sale', 'new', f'tag{i}']} for i in range(8)]},
    'enums': {'color': 'green', 'size': 'medium', 'mode': 'auto'},
    'required+optional': {'id': 1234567, 'title': 'On computable numbers',
                          'author': 'Alan Turing', 'year': 1936},
    'numbers+booleans': {'price': 1299.95, 'count': 42, 'in_stock': True, 'ratio': -0.0625,
                         'flags': [True, False, True, True, False, False, True]},
}


REPEATS = 5  # fresh compile and document per repeat; the machine is shared, so take several


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _drive(fill, accept, tokens: list[int], bitmask: np.ndarray) -> list[float]:
    """Fill times in us, one per token (the stop id last), checking each token is allowed."""
    times = []
    for t in tokens + [GLM_EOS[0]]:
        start = time.perf_counter()
        fill()
        times.append((time.perf_counter() - start) * 1e6)
        assert bitmask[0, t // 32] >> (t % 32) & 1, t
        assert accept(t), t
    return times


def bench_llguidance(tok, tokens: dict[str, list[int]]) -> dict[str, list[tuple]]:
    import llguidance
    import llguidance.numpy as lnp
    bitmask = lnp.allocate_token_bitmask(1, GLM_VOCAB)
    out = {}
    for name, schema in SCHEMAS.items():
        out[name] = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            m = llguidance.LLMatcher(tok, grammar, log_level=0)
            compile_ms = (time.perf_counter() - start) * 1e3
            assert not m.is_error(), m.get_error()
            fills = _drive(lambda m=m: lnp.fill_next_token_bitmask(m, bitmask, 0),
                           m.consume_token, tokens[name], bitmask)
            out[name].append((compile_ms, fills))
    return out


def bench_xgrammar(pieces: list[str], tokens: dict[str, list[int]]) -> dict[str, list[tuple]]:
    import xgrammar
    # Special tokens as empty strings: xgrammar then never allows them as text, as llguidance.
    info = xgrammar.TokenizerInfo(
        pieces[:GLM_SPECIAL_START] + [''] * (GLM_VOCAB - GLM_SPECIAL_START),
        xgrammar.VocabType.BYTE_LEVEL, vocab_size=GLM_VOCAB, stop_token_ids=GLM_EOS)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    bitmask = np.full((1, (GLM_VOCAB + 31) // 32), -1, np.int32)
    out = {}
    for name, schema in SCHEMAS.items():
        out[name] = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            m = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
            compile_ms = (time.perf_counter() - start) * 1e3
            fills = _drive(lambda m=m: m.fill_next_token_bitmask(bitmask, 0), m.accept_token,
                           tokens[name], bitmask)
            out[name].append((compile_ms, fills))
    return out


def _timed_import(name: str) -> float:
    start = time.perf_counter()
    __import__(name)
    return time.perf_counter() - start


def main():
    imports = {lib: _timed_import(lib) for lib in ('llguidance', 'xgrammar')}
    start = time.perf_counter()
    pieces = synthetic_vocab()
    hf = hf_tokenizer(pieces)
    import llguidance
    tok = llguidance.LLTokenizer(hf.to_str(), n_vocab=GLM_VOCAB, eos_token=GLM_EOS)
    tokens = {name: hf.encode(json.dumps(doc, ensure_ascii=False)).ids
              for name, doc in DOCUMENTS.items()}
    print(f'vocabulary: {len(pieces)} tokens, built in {time.perf_counter() - start:.1f} s')
    results = {'xgrammar': bench_xgrammar(pieces, tokens),
               'llguidance': bench_llguidance(tok, tokens)}
    print(f'xgrammar {version("xgrammar")} (import {imports["xgrammar"]:.1f} s: it imports '
          f'torch), llguidance {version("llguidance")} (import {imports["llguidance"]:.2f} s)')
    print(f'compile: median ms of {REPEATS}; mask fill: us per token, `first` the median for '
          f'the first token, mean and p99 over all tokens of {REPEATS} runs')
    head = f'{"schema":<18} {"tokens":>6} |'
    for lib in results:
        head += f' {lib + " compile":>20} {"first":>6} {"mean":>6} {"p99":>6} |'
    print(head)
    for name in SCHEMAS:
        row = f'{name:<18} {len(tokens[name]) + 1:>6} |'
        for lib in results:
            runs = results[lib][name]
            fills = [us for _, f in runs for us in f]
            row += (f' {statistics.median(c for c, _ in runs):20.1f} '
                    f'{statistics.median(f[0] for _, f in runs):6.0f} '
                    f'{statistics.fmean(fills):6.1f} {_p99(fills):6.1f} |')
        print(row)


if __name__ == '__main__':
    main()
