"""Constrained decoding, the host side: what a request may ask for, compiled grammars, and a
matcher per sequence that writes the allowed-token bitmask for the next step.

The grammar library is llguidance, chosen by benchmarks/grammar_bench.py (a 151,552-token
vocabulary): it compiles a JSON schema in about a millisecond where xgrammar takes 3-130 ms
(on the request path for every new schema or tool list); its masks are several times slower
(20-130 us per token on average, xgrammar's 4-20) but far below a decode step; it refuses
the JSON-schema keywords it cannot enforce where xgrammar ignores some (`not`, `if`, unknown
formats); and it depends on nothing, where xgrammar needs torch, transformers and triton.

Use:
    compiler = ConstraintCompiler(tokenizer, cfg.vocab_size, stop_ids=eos_ids)
    m = compiler.matcher(ConstraintSpec.json_schema(schema), reasoning=True, reasoning_budget=N)
    each step: m.fill(bitmask, row); sample under the mask; m.accept(token)

The bitmask is xgrammar's and llguidance's layout: int32 [B, ceil(V / 32)], token t allowed
when bit t % 32 of word t // 32 is set (glmjax.token_mask applies it on the device). V is the
model's vocab_size; ids the tokenizer does not have are never allowed. A stop id (the model's
eos ids) is allowed exactly when the grammar is complete, so a sequence ends by the engine's
usual stop-id check; the matcher is then `is_terminated()`.

Not a silent relaxation, ever: a schema keyword the library does not enforce, a malformed
regex or grammar, a tool schema the tool-call grammar cannot follow, all raise
UnsupportedConstraint (a ValueError) naming what is refused. Outputs may be narrower than the
schema allows: object properties come in the schema's order, JSON whitespace runs are bounded,
and a tool call carries only the parameters its schema declares.
"""

import collections
import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from glmjax.serving.glm_parser import CALL, END_CALL, END_KEY, END_THINK, END_VALUE, KEY, VALUE
from glmjax.serving.tokenizer import Tokenizer

Kind = Literal['json_object', 'json_schema', 'regex', 'choice', 'grammar', 'tool_call']
CACHE_SIZE = 128  # compiled grammars kept per compiler

# JSON whitespace: llguidance's default allows any run between tokens, and a model under a
# mask can emit blank lines forever; one optional newline plus indentation keeps compact and
# pretty-printed JSON (12 levels of 2-space indent) possible. `lenient` and `coerce_one_of`
# are the options that would approximate a schema; they stay off whatever the schema says.
_JSON_OPTIONS = {'whitespace_pattern': r'(\r?\n)?[ \t]{0,24}', 'lenient': False,
                 'coerce_one_of': False}

# Keywords llguidance accepts but does not enforce (it refuses the other unimplemented ones,
# naming them); 2020-12 calls these annotations, but a client that sets them expects them.
_UNENFORCED = ('contentEncoding', 'contentMediaType', 'contentSchema')
# Keywords whose value is a subschema, a list of them, or a name -> subschema map: the walk
# over a schema follows these only, so a property *named* like a keyword is not one.
_SCHEMA = ('additionalProperties', 'not', 'if', 'then', 'else', 'contains', 'propertyNames',
           'unevaluatedItems', 'unevaluatedProperties', 'additionalItems', 'items')
_SCHEMA_LISTS = ('allOf', 'anyOf', 'oneOf', 'prefixItems', 'items')
_SCHEMA_MAPS = ('properties', 'patternProperties', '$defs', 'definitions', 'dependentSchemas')
_ANNOTATIONS = {'title', 'description', 'default', 'examples', 'deprecated', 'readOnly',
                'writeOnly', '$comment'}
_RAW_STRING_KEYWORDS = _ANNOTATIONS | {'type', 'enum', 'const', 'pattern', 'minLength',
                                       'maxLength'}
_PARAMETERS_KEYWORDS = _ANNOTATIONS | {'type', 'properties', 'required', 'additionalProperties',
                                       '$schema', '$id', '$defs', 'definitions'}
_TOOL_NAME = re.compile(r'[A-Za-z0-9_.:-]+')  # no whitespace or '<': the parser splits on them


class UnsupportedConstraint(ValueError):
    """A constraint that cannot be enforced as asked; `feature` names the keyword, option or
    part refused, and the message says why."""

    def __init__(self, feature: str, message: str):
        super().__init__(message)
        self.feature = feature


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: str  # the parameters' JSON schema, canonical JSON


@dataclasses.dataclass(frozen=True)
class ConstraintSpec:
    """What a request constrains its output to; hashable, the key of the grammar cache. Build
    it with the class methods, which validate and canonicalise."""

    kind: Kind
    text: str = ''  # json_schema: canonical JSON; regex: the pattern; grammar: the source
    choices: tuple[str, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_name: str | None = None  # tool_call: this function exactly once; None: one or more

    @classmethod
    def json_object(cls) -> 'ConstraintSpec':
        return cls('json_object')

    @classmethod
    def json_schema(cls, schema: dict) -> 'ConstraintSpec':
        if not isinstance(schema, dict):
            raise UnsupportedConstraint('json_schema', 'a JSON schema must be an object')
        return cls('json_schema', _canonical(schema, 'json_schema'))

    @classmethod
    def regex(cls, pattern: str) -> 'ConstraintSpec':
        """The whole output matches `pattern` (Rust regex syntax; no lookaround)."""
        return cls('regex', pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> 'ConstraintSpec':
        """The output is exactly one of `choices`."""
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise UnsupportedConstraint('choice', 'choice needs one or more non-empty strings')
        return cls('choice', choices=tuple(choices))

    @classmethod
    def grammar(cls, source: str) -> 'ConstraintSpec':
        """A Lark grammar in llguidance's dialect, or a GBNF (llama.cpp) one."""
        return cls('grammar', source)

    @classmethod
    def tool_call(cls, tools: Sequence[dict], name: str | None = None) -> 'ConstraintSpec':
        """Tool calls in GLM's format: one or more calls of any of `tools` (OpenAI's
        tool_choice "required"), or with `name` exactly one call of that function. Each tool
        is {"name", "parameters"}, or OpenAI's {"type": "function", "function": {...}}."""
        specs = tuple(_tool_spec(t, i) for i, t in enumerate(tools))
        names = [t.name for t in specs]
        if not specs:
            raise UnsupportedConstraint('tools', 'a tool-call constraint needs tools')
        if len(set(names)) < len(names):
            raise UnsupportedConstraint('tools', 'two tools have the same name')
        if name is not None and name not in names:
            raise UnsupportedConstraint('tool_choice', f'tool_choice names {name!r}, which is '
                                        'not in tools')
        return cls('tool_call', tools=specs, tool_name=name)


def _canonical(schema: Any, where: str) -> str:
    # Key order is kept, not sorted: llguidance emits properties in the schema's order, so
    # two orders are two grammars.
    try:
        return json.dumps(schema, ensure_ascii=False, separators=(',', ':'), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnsupportedConstraint(where, f'{where} is not JSON: {e}') from None


def _tool_spec(tool: Any, i: int) -> ToolSpec:
    fn = tool.get('function', tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get('name'), str):
        raise UnsupportedConstraint(f'tools[{i}]', f'tools[{i}] needs a name')
    if not _TOOL_NAME.fullmatch(fn['name']):
        raise UnsupportedConstraint(f'tools[{i}].name', f'tool name {fn["name"]!r}: only '
                                    'letters, digits and _ . : - can be parsed back')
    parameters = fn.get('parameters') or {'type': 'object', 'properties': {}}
    return ToolSpec(fn['name'], _canonical(parameters, f'tools[{i}].parameters'))


# JSON schemas: the checks llguidance does not make.

def _clean_schema(schema: Any, where: str) -> Any:
    """`schema` without `uniqueItems: false` (it asks nothing, but llguidance refuses the
    keyword whatever its value); raises on a keyword llguidance would silently ignore."""
    if not isinstance(schema, dict):
        return schema
    for key in _UNENFORCED:
        if key in schema:
            raise UnsupportedConstraint(key, f'{where}: {key} cannot be enforced')
    out = {k: v for k, v in schema.items() if not (k == 'uniqueItems' and v is False)}
    for key in _SCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = _clean_schema(out[key], f'{where}.{key}')
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_clean_schema(s, f'{where}.{key}[{i}]') for i, s in enumerate(out[key])]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {n: _clean_schema(s, f'{where}.{key}.{n}') for n, s in out[key].items()}
    return out


def _json_schema_grammar(schema: dict) -> str:
    if 'x-guidance' in schema:  # llguidance's own options, which could loosen the schema
        raise UnsupportedConstraint('x-guidance', 'x-guidance options cannot be set')
    return llguidance.LLMatcher.grammar_from_json_schema(_clean_schema(schema, 'schema'),
                                                         overrides=_JSON_OPTIONS)


# GLM's tool-call format (glmjax/serving/glm_parser.py reads it back):
#   <tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n ... </tool_call>
# A string-typed argument (type exactly "string", as the parser decides) is raw text; any other
# is JSON. The grammar follows the parser, not the other way round.

def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _regex_literal(text: str) -> str:
    # The characters regex-syntax's escape() escapes, then what lark's /.../ needs.
    return llguidance.regex_to_lark(re.sub(r'([\\.+*?()|\[\]{}^$#&\-~])', r'\\\1', text), '')


def _pattern_regex(pattern: str, where: str) -> str:
    """A JSON-schema `pattern` (a search, anchored only by ^ and $) as a full-match regex."""
    core = llguidance.regex_to_lark(pattern, 'dw')  # JSON schema's \d and \w are ASCII
    start, end = core.startswith('^'), core.endswith('$') and not core.endswith('\\$')
    inner = core[int(start):len(core) - int(end)]
    if _has_bare(inner, '^$') or ((start or end) and _has_bare(inner, '|')):
        raise UnsupportedConstraint('pattern', f'{where}: pattern {pattern!r} uses ^ or $ '
                                    'other than at its two ends')
    any_text = '(?s:.)*'
    return f'{"" if start else any_text}(?:{inner}){"" if end else any_text}'


def _has_bare(regex: str, chars: str) -> bool:
    """Whether one of `chars` occurs unescaped, outside brackets and (for |) at depth 0."""
    depth, in_class, i = 0, False, 0
    while i < len(regex):
        c = regex[i]
        if c == '\\':
            i += 2
            continue
        if in_class:
            in_class = c != ']'
        elif c == '[':
            in_class, i = True, i + (regex[i + 1:i + 2] == ']')
        elif c in '()':
            depth += 1 if c == '(' else -1
        elif c in chars and (c != '|' or depth == 0):
            return True
        i += 1
    return False


def _raw_string_terminal(schema: dict, where: str) -> str:
    """The lark terminal of a raw string value: the schema's constraints, intersected with
    'does not contain </arg_value>' (the parser would end the value there)."""
    for key in schema:
        if key not in _RAW_STRING_KEYWORDS:
            raise UnsupportedConstraint(key, f'{where}: {key} is not supported on a '
                                        'string-typed tool argument (written raw)')
    parts = []
    if 'const' in schema or 'enum' in schema:
        options = [schema['const']] if 'const' in schema else schema['enum']
        options = [o for o in options if isinstance(o, str)]
        if not options:
            raise UnsupportedConstraint('enum', f'{where}: no string in enum/const')
        parts.append('|'.join(_regex_literal(o) for o in options))
    if 'pattern' in schema:
        parts.append(_pattern_regex(schema['pattern'], where))
    if 'minLength' in schema or 'maxLength' in schema:
        parts.append(f'(?s:.){{{int(schema.get("minLength", 0))},'
                     f'{int(schema["maxLength"]) if "maxLength" in schema else ""}}}')
    parts = parts or ['(?s:.)*']
    body = ' & '.join(f'/{p}/' for p in parts)
    return f'{body} & ~/(?s:.)*{_regex_literal(END_VALUE)}(?s:.)*/'


def _inline_json(schema: dict, root: dict) -> str:
    # An inline schema is its own document: $ref into the tool's $defs needs them beside it.
    doc = {k: root[k] for k in ('$defs', 'definitions') if k in root}
    doc.update(schema, **{'x-guidance': _JSON_OPTIONS})
    return '%json ' + json.dumps(doc, ensure_ascii=False)


class _ToolGrammar:
    def __init__(self, tag):
        self.tag, self.rules = tag, []  # tag: a tag's text -> its lark reference

    def call(self, i: int, tool: ToolSpec) -> str:
        where = f'tools[{i}].parameters'
        params = self._check_parameters(json.loads(tool.parameters), where)
        props, required = params.get('properties', {}), params.get('required', [])
        extra = params.get('additionalProperties', True)
        args = []
        for j, key in enumerate(list(props) + [r for r in required if r not in props]):
            schema = props[key] if key in props else extra
            if schema is False:  # no value is valid
                if key in required:
                    raise UnsupportedConstraint('required', f'{where}: {key!r} is required '
                                                'but no value is allowed')
                continue
            arg = self._argument(f'a{i}_{j}', key, {} if schema is True else schema, params,
                                 f'{where}.{key}')
            args.append(arg if key in required else arg + '?')
        rule, name = f'call{i}', _lark_literal(tool.name + '\n')
        self.rules.append(f'{rule}: "\\n"? {self.tag(CALL)} {name} {" ".join(args)} '
                          f'{self.tag(END_CALL)}')
        return rule

    def _check_parameters(self, params: Any, where: str) -> dict:
        if not isinstance(params, dict) or params.get('type', 'object') != 'object':
            raise UnsupportedConstraint('type', f'{where} must be an object schema')
        for key in params:
            if key not in _PARAMETERS_KEYWORDS:
                raise UnsupportedConstraint(key, f'{where}: {key} is not supported on tool '
                                            'parameters (each argument is written separately)')
        props, required = params.get('properties', {}), params.get('required', [])
        if not isinstance(props, dict) or not isinstance(required, list) \
                or not all(isinstance(k, str) for k in required):
            raise UnsupportedConstraint('properties', f'{where}: properties must be an object '
                                        'and required a list of names')
        for key in [*props, *required]:
            if not key or key != key.strip() or END_KEY in key:
                raise UnsupportedConstraint('properties', f'{where}: argument name {key!r} '
                                            'cannot be parsed back')
        return _clean_schema(params, where)

    def _argument(self, rule: str, key: str, schema: dict, root: dict, where: str) -> str:
        if not isinstance(schema, dict):
            raise UnsupportedConstraint(key, f'{where}: a schema must be an object')
        if schema.get('type') == 'string':
            value = rule.upper()
            self.rules.append(f'{value}: {_raw_string_terminal(schema, where)}')
        else:
            value = f'v{rule}'
            self.rules.append(f'{value}: {_inline_json(schema, root)}')
        self.rules.append(f'{rule}: {self.tag(KEY)} {_lark_literal(key)} {self.tag(END_KEY)} '
                          f'"\\n" {self.tag(VALUE)} {value} {self.tag(END_VALUE)} "\\n"')
        return rule


def _tool_call_lark(spec: ConstraintSpec, tag) -> str:
    grammar = _ToolGrammar(tag)
    chosen = [(i, t) for i, t in enumerate(spec.tools)
              if spec.tool_name is None or t.name == spec.tool_name]
    calls = [grammar.call(i, t) for i, t in chosen]
    start = f'start: {calls[0]}' if spec.tool_name else f'start: call+\ncall: {" | ".join(calls)}'
    return '\n'.join([start, *grammar.rules])


class CompiledConstraint:
    """A compiled grammar, shared by every request with the same spec. Matchers are copies of
    a pristine one (cheaper than building one, and they share its lexer)."""

    def __init__(self, spec: ConstraintSpec, template: llguidance.LLMatcher):
        self.spec, self._template = spec, template

    def new_matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()


class Matcher(Protocol):
    """What the engine drives per constrained sequence (ConstraintMatcher, ReasoningMatcher)."""

    stop_ids: frozenset[int]  # the ids that end the sequence, allowed once it is complete

    def fill(self, bitmask: np.ndarray, row: int) -> None: ...
    def accept(self, token_id: int) -> bool: ...
    def rollback(self, n: int) -> None: ...
    def is_complete(self) -> bool: ...
    def is_terminated(self) -> bool: ...


def _bitmask_row(allowed: set[int], words: int) -> np.ndarray:
    bits = np.zeros(words * 32, bool)
    bits[list(allowed)] = True
    return np.packbits(bits, bitorder='little').view('<i4').astype(np.int32)


def _check_bitmask(bitmask: np.ndarray, words: int):
    if bitmask.dtype != np.int32 or bitmask.ndim != 2 or bitmask.shape[1] != words \
            or not bitmask.flags.c_contiguous:
        raise ValueError(f'bitmask must be C-contiguous int32 [B, {words}], got '
                         f'{bitmask.dtype} {bitmask.shape}')


class ConstraintMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, compiled: CompiledConstraint, words: int, stop_ids: frozenset[int]):
        self.spec, self.stop_ids = compiled.spec, stop_ids
        self._m, self._words = compiled.new_matcher(), words
        self._stopped = False  # the last accepted token was a stop id

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Writes row `row` of `bitmask` (int32 [B, ceil(V / 32)]): the tokens allowed next."""
        _check_bitmask(bitmask, self._words)
        llg_numpy.fill_next_token_bitmask(self._m, bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advances over `token_id`; False (and no change) if the grammar does not allow it."""
        if self._stopped:
            return False
        token_id = int(token_id)
        if token_id in self.stop_ids:  # try_consume_tokens never takes one
            self._stopped = self._m.is_accepting() and self._m.consume_token(token_id)
            return self._stopped
        return self._m.try_consume_tokens([token_id]) == 1

    def rollback(self, n: int) -> None:
        """Undoes the last `n` accepted tokens (speculative decoding's rejected drafts)."""
        if n and not self._m.rollback(n):
            raise ValueError(f'cannot roll back {n} tokens: {self._m.get_error()}')
        self._stopped = self._stopped and not n

    def is_complete(self) -> bool:
        """The output so far satisfies the grammar: a stop id may come next."""
        return self._m.is_accepting()

    def is_terminated(self) -> bool:
        """A stop id was accepted: the output is complete."""
        return self._stopped


class FreeMatcher:
    """An answer without a constraint (a reasoning budget alone): every token the tokenizer
    has is allowed, stop ids included."""

    def __init__(self, row: np.ndarray, stop_ids: frozenset[int]):
        self.spec, self.stop_ids, self._row = None, stop_ids, row
        self._stopped = False

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        _check_bitmask(bitmask, self._row.shape[0])
        bitmask[row] = self._row

    def accept(self, token_id: int) -> bool:
        if self._stopped:
            return False
        self._stopped = int(token_id) in self.stop_ids
        return True

    def rollback(self, n: int) -> None:
        self._stopped = self._stopped and not n

    def is_complete(self) -> bool:
        return True

    def is_terminated(self) -> bool:
        return self._stopped


class ReasoningMatcher:
    """Leaves the reasoning free and constrains the answer: until `</think>` is generated any
    token of `free_row` is allowed (all but the stop ids and `<tool_call>`, which would end
    the reasoning without an answer); after `budget` reasoning tokens only `</think>` is."""

    def __init__(self, inner: 'ConstraintMatcher | FreeMatcher', think_end: int,
                 budget: int | None,
                 free_row: np.ndarray, end_row: np.ndarray):
        self.inner, self.stop_ids = inner, inner.stop_ids
        self.think_end, self.budget = think_end, budget
        self._free, self._end = free_row, end_row
        self.reasoning_tokens = 0  # generated before </think>
        self.answering = False
        self._answer_tokens = 0  # accepted by the inner matcher

    def _row(self) -> np.ndarray:
        over = self.budget is not None and self.reasoning_tokens >= self.budget
        return self._end if over else self._free

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        if self.answering:
            self.inner.fill(bitmask, row)
        else:
            _check_bitmask(bitmask, self._free.shape[0])
            bitmask[row] = self._row()

    def accept(self, token_id: int) -> bool:
        if self.answering:
            accepted = self.inner.accept(token_id)
            self._answer_tokens += accepted
            return accepted
        if not 0 <= token_id < self._free.shape[0] * 32 \
                or not self._row()[token_id // 32] >> (token_id % 32) & 1:
            return False
        if token_id == self.think_end:
            self.answering = True
        else:
            self.reasoning_tokens += 1
        return True

    def rollback(self, n: int) -> None:
        if n > self._answer_tokens + self.answering + self.reasoning_tokens:
            raise ValueError(f'cannot roll back {n} tokens: more than were generated')
        inner = min(n, self._answer_tokens)
        self.inner.rollback(inner)
        self._answer_tokens -= inner
        n -= inner
        if n and self.answering:
            self.answering, n = False, n - 1
        self.reasoning_tokens -= n

    def is_complete(self) -> bool:
        return self.answering and self.inner.is_complete()

    def is_terminated(self) -> bool:
        return self.answering and self.inner.is_terminated()


class ConstraintCompiler:
    """Compiles constraint specs for one tokenizer and model vocabulary, with an LRU of the
    compiled grammars keyed by (spec, tokenizer identity). Thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int],
                 cache_size: int = CACHE_SIZE):
        if tokenizer.kind != 'tokenizers':
            raise UnsupportedConstraint('tokenizer', 'constrained decoding needs a '
                                        'tokenizer.json tokenizer')
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(f'vocab_size {vocab_size} < the tokenizer\'s {tokenizer.vocab_size}')
        # The Tokenizer has no public way to its tokenizer.json; llguidance reads that.
        source = tokenizer._backend.to_str()
        self.vocab_size, self.stop_ids = vocab_size, frozenset(int(i) for i in stop_ids)
        self.words = (vocab_size + 31) // 32
        self.identity = hashlib.sha256(
            f'{source}|{vocab_size}|{sorted(self.stop_ids)}'.encode()).hexdigest()
        self._tokenizer = tokenizer
        self._lltok = llguidance.LLTokenizer(source, n_vocab=vocab_size,
                                             eos_token=sorted(self.stop_ids))
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size, self._lock = cache_size, threading.Lock()
        self._reasoning_rows: tuple[np.ndarray, np.ndarray] | None = None  # on first use
        self._any_row: np.ndarray | None = None

    def compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        key = (spec, self.identity)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = CompiledConstraint(spec, self._build(spec))  # outside the lock: may be slow
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: ConstraintSpec | None, reasoning: bool = False,
                reasoning_budget: int | None = None) -> Matcher:
        """A fresh matcher for one sequence. reasoning: the model thinks first (GLM's
        `<think>...</think>`) and the constraint applies after `</think>`; reasoning_budget:
        at most this many reasoning tokens, then `</think>` is forced. spec None: no
        constraint on the answer (a budget alone)."""
        if spec is None:
            if reasoning_budget is None:
                raise ValueError('no constraint and no reasoning budget: nothing to match')
            if self._any_row is None:
                self._any_row = _bitmask_row(set(range(self._tokenizer.vocab_size))
                                             | set(self.stop_ids), self.words)
            inner = FreeMatcher(self._any_row, self.stop_ids)
        else:
            inner = ConstraintMatcher(self.compile(spec), self.words, self.stop_ids)
        if not reasoning:
            if reasoning_budget is not None:
                raise ValueError('a reasoning budget needs reasoning')
            return inner
        if reasoning_budget is not None and reasoning_budget < 0:
            raise ValueError(f'reasoning budget must be >= 0, got {reasoning_budget}')
        think_end = self._tokenizer.token_id(END_THINK)
        if think_end is None:
            raise UnsupportedConstraint('reasoning', f'the tokenizer has no {END_THINK} token')
        if self._reasoning_rows is None:
            free = set(range(self._tokenizer.vocab_size)) - self.stop_ids
            free.discard(self._tokenizer.token_id(CALL))
            self._reasoning_rows = (_bitmask_row(free, self.words),
                                    _bitmask_row({think_end}, self.words))
        return ReasoningMatcher(inner, think_end, reasoning_budget, *self._reasoning_rows)

    def _tag(self, text: str) -> str:
        """A format tag in a lark grammar: its token when the tokenizer has it as one (then
        llguidance sees only the token, never its spelling), else its text."""
        i = self._tokenizer.token_id(text)
        return f'<[{i}]>' if i is not None and self._lltok.is_special_token(i) \
            else _lark_literal(text)

    def _grammar(self, spec: ConstraintSpec) -> str:
        if spec.kind == 'json_object':
            return _json_schema_grammar({'type': 'object'})
        if spec.kind == 'json_schema':
            return _json_schema_grammar(json.loads(spec.text))
        if spec.kind == 'regex':
            return llguidance.LLMatcher.grammar_from_regex(spec.text)
        if spec.kind == 'choice':
            return llguidance.LLMatcher.grammar_from_lark(
                'start: ' + ' | '.join(_lark_literal(c) for c in spec.choices))
        if spec.kind == 'grammar':
            try:
                return llguidance.grammar_from('grammar', spec.text)
            except ValueError as e:
                raise UnsupportedConstraint('grammar', str(e)) from None
        if spec.kind == 'tool_call':
            return llguidance.LLMatcher.grammar_from_lark(_tool_call_lark(spec, self._tag))
        raise UnsupportedConstraint('kind', f'unknown constraint kind {spec.kind!r}')

    def _build(self, spec: ConstraintSpec) -> llguidance.LLMatcher:
        grammar = self._grammar(spec)
        matcher = llguidance.LLMatcher(self._lltok, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            message = matcher.get_error()
            keyword = re.search(r'Unimplemented keys: \["([^"]+)"', message)
            raise UnsupportedConstraint(keyword[1] if keyword else spec.kind,
                                        f'{spec.kind}: {message}')
        if spec.kind != 'grammar' and matcher.get_grammar_warnings():
            # A warning on a grammar we generate may be a loosened schema: refuse it.
            raise UnsupportedConstraint(spec.kind, f'{spec.kind}: '
                                        + '; '.join(matcher.get_grammar_warnings()))
        return matcher
