"""Constrained decoding: every output sampled under the mask is what was asked for.

The tokenizer is the demo model's (4096 tokens) under a model vocabulary padded to 4160, so
ids past the tokenizer are present and must never be allowed. Sampling draws from i.i.d.
N(0, 1) logits at temperature 1; with i.i.d. logits every allowed token is equally likely, so
the host loops draw uniformly from the mask (as likely a walk into every corner of the
grammar as random weights give, at a fraction of the cost); one test goes through
apply_token_bitmask and a real categorical draw on the device path instead.
"""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from glmjax.serving import glm_parser
from glmjax.serving.constraints import ConstraintCompiler, ConstraintSpec, UnsupportedConstraint
from glmjax.serving.server import DEMO_MODEL
from glmjax.serving.tokenizer import Tokenizer
from glmjax.token_mask import all_allowed_bitmask, apply_token_bitmask, bitmask_words

VOCAB = 4160  # the model's; the tokenizer has 4096
STOPS = (0, 7, 9)  # the demo model's eos ids: <|endoftext|>, <|user|>, <|observation|>
S12 = {'type': 'string', 'maxLength': 12}  # bounded, so that uniform draws end

SCHEMAS = {
    'nested objects': {
        'type': 'object', 'additionalProperties': False, 'required': ['user', 'meta'],
        'properties': {
            'user': {'type': 'object', 'additionalProperties': False,
                     'required': ['name', 'address'],
                     'properties': {'name': S12, 'address': {
                         'type': 'object', 'additionalProperties': False,
                         'required': ['city', 'zip'],
                         'properties': {'city': S12,
                                        'zip': {'type': 'string', 'pattern': '^[0-9]{5}$'}}}}},
            'meta': {'type': 'object', 'additionalProperties': False,
                     'properties': {'source': S12}}}},
    'arrays with item schemas': {
        'type': 'object', 'additionalProperties': False, 'required': ['items'],
        'properties': {'items': {'type': 'array', 'minItems': 1, 'maxItems': 4, 'items': {
            'type': 'object', 'additionalProperties': False, 'required': ['sku', 'qty'],
            'properties': {'sku': S12, 'qty': {'type': 'integer', 'minimum': 1, 'maximum': 99},
                           'tags': {'type': 'array', 'maxItems': 3,
                                    'items': {'type': 'string', 'maxLength': 6}}}}}}},
    'enums': {
        'type': 'object', 'additionalProperties': False, 'required': ['color', 'size', 'mode'],
        'properties': {'color': {'enum': ['red', 'green', 'blue']},
                       'size': {'type': 'string', 'enum': ['small', 'medium', 'large']},
                       'mode': {'enum': [1, 2.5, 'auto', None, True]}}},
    'required and optional': {
        'type': 'object', 'additionalProperties': False, 'required': ['id', 'title'],
        'properties': {'id': {'type': 'integer'}, 'title': S12, 'summary': S12, 'author': S12,
                       'year': {'type': 'integer', 'minimum': 1900, 'maximum': 2100}}},
    'numbers and booleans': {
        'type': 'object', 'additionalProperties': False,
        'required': ['price', 'count', 'in_stock', 'ratio'],
        'properties': {'price': {'type': 'number', 'minimum': 0},
                       'count': {'type': 'integer', 'minimum': 0, 'maximum': 1000},
                       'in_stock': {'type': 'boolean'},
                       'ratio': {'type': 'number', 'exclusiveMinimum': -1, 'maximum': 1},
                       'flags': {'type': 'array', 'maxItems': 5, 'items': {'type': 'boolean'}}}},
}

TOOLS = [
    {'type': 'function', 'function': {'name': 'get_weather', 'parameters': {
        'type': 'object', 'required': ['city'], 'properties': {
            'city': {'type': 'string', 'minLength': 1, 'maxLength': 12},
            'days': {'type': 'integer', 'minimum': 1, 'maximum': 14},
            'unit': {'type': 'string', 'enum': ['celsius', 'fahrenheit']}}}}},
    {'type': 'function', 'function': {'name': 'search_files', 'parameters': {
        'type': 'object', 'required': ['query', 'filters'], 'properties': {
            'query': {'type': 'string', 'pattern': '^[a-z_]{1,10}$'},
            'filters': {'type': 'object', 'additionalProperties': False, 'properties': {
                'ext': {'type': 'string', 'maxLength': 4}, 'recursive': {'type': 'boolean'}}},
            'limit': {'type': ['integer', 'null'], 'maximum': 50}}}}},
    {'name': 'get_time', 'parameters': {}},
]


@pytest.fixture(scope='module')
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DEMO_MODEL)


@pytest.fixture(scope='module')
def compiler(tokenizer) -> ConstraintCompiler:
    return ConstraintCompiler(tokenizer, VOCAB, STOPS)


def allowed(bitmask_row: np.ndarray) -> np.ndarray:
    """The numpy reference: bool [V] from one int32 bitmask row."""
    return np.unpackbits(bitmask_row.view(np.uint8), bitorder='little')[:VOCAB].astype(bool)


def sample(matchers, seed: int, cap: int, tokenizer_size: int = 4096) -> list[list[int]]:
    """Runs every matcher to its stop id; the tokens before it, per matcher."""
    rng = np.random.default_rng(seed)
    bitmask = np.zeros((len(matchers), bitmask_words(VOCAB)), np.int32)
    out = [[] for _ in matchers]
    live = list(range(len(matchers)))
    for _ in range(cap):
        for r in live:
            matchers[r].fill(bitmask, r)
        still = []
        for r in live:
            ok = allowed(bitmask[r])
            assert not ok[tokenizer_size:].any(), 'an id past the tokenizer was allowed'
            token = int(rng.choice(np.flatnonzero(ok)))
            assert matchers[r].accept(token)
            if not matchers[r].is_terminated():
                out[r].append(token)
                still.append(r)
        if not (live := still):
            return out
    raise AssertionError(f'{len(live)} of {len(matchers)} did not end in {cap} tokens')


@pytest.mark.parametrize('name', SCHEMAS)
def test_json_schema_outputs_validate(compiler, tokenizer, name):
    spec = ConstraintSpec.json_schema(SCHEMAS[name])
    validator = jsonschema.Draft202012Validator(SCHEMAS[name])
    for tokens in sample([compiler.matcher(spec) for _ in range(200)], seed=1, cap=600):
        validator.validate(json.loads(tokenizer.decode(tokens)))


def test_json_object_outputs_parse(compiler, tokenizer):
    outputs = sample([compiler.matcher(ConstraintSpec.json_object()) for _ in range(100)],
                     seed=2, cap=4000)
    assert all(isinstance(json.loads(tokenizer.decode(t)), dict) for t in outputs)


def test_regex_and_choice_outputs_match(compiler, tokenizer):
    pattern = r'(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-9]{2}( [a-z]{1,8})?'
    for tokens in sample([compiler.matcher(ConstraintSpec.regex(pattern)) for _ in range(100)],
                         seed=3, cap=100):
        assert re.fullmatch(pattern, tokenizer.decode(tokens))
    choices = ['yes', 'no', 'none of them', 'say "hi"\n', 'déjà vu']
    outputs = sample([compiler.matcher(ConstraintSpec.choice(choices)) for _ in range(100)],
                     seed=4, cap=100)
    texts = {tokenizer.decode(t) for t in outputs}
    assert texts <= set(choices) and len(texts) > 1


def _calls(tokenizer, tokens) -> list[tuple[str, dict]]:
    parsed = glm_parser.parse(tokenizer.decode(tokens), TOOLS)
    assert parsed.content == '' and parsed.reasoning == ''
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


def _parameters(name: str) -> dict:
    return next(t.get('function', t)['parameters'] for t in TOOLS
                if t.get('function', t)['name'] == name)


def test_tool_choice_required_parses_into_valid_calls(compiler, tokenizer):
    spec = ConstraintSpec.tool_call(TOOLS)
    names = set()
    for tokens in sample([compiler.matcher(spec) for _ in range(200)], seed=5, cap=600):
        calls = _calls(tokenizer, tokens)
        assert calls
        for name, args in calls:
            jsonschema.validate(args, _parameters(name) or {'type': 'object'})
            names.add(name)
    assert names == {'get_weather', 'search_files', 'get_time'}


def test_tool_choice_named_makes_exactly_that_call(compiler, tokenizer):
    spec = ConstraintSpec.tool_call(TOOLS, name='search_files')
    for tokens in sample([compiler.matcher(spec) for _ in range(50)], seed=6, cap=600):
        [(name, args)] = _calls(tokenizer, tokens)
        assert name == 'search_files'
        jsonschema.validate(args, _parameters(name))


def test_raw_string_argument_cannot_spell_out_its_end_tag(compiler, tokenizer):
    """`</arg_value>` written in plain characters would end the value for the parser."""
    m = compiler.matcher(ConstraintSpec.tool_call(
        [{'name': 'echo', 'parameters': {'properties': {'text': {'type': 'string'}}}}]))
    prefix = '<tool_call>echo\n<arg_key>text</arg_key>\n<arg_value>a'
    assert all(m.accept(t) for t in tokenizer.encode(prefix))
    spelled = [tokenizer.encode(c)[0] for c in '</arg_value>']
    assert not all(m.accept(t) for t in spelled)


@pytest.mark.parametrize('schema, keyword', [
    ({'type': 'array', 'uniqueItems': True}, 'uniqueItems'),
    ({'not': {'type': 'string'}}, 'not'),
    ({'type': 'object', 'properties': {'a': {'type': 'string', 'contentEncoding': 'base64'}}},
     'contentEncoding'),
    ({'if': {'type': 'string'}, 'then': {'minLength': 2}}, 'if'),
    ({'type': 'array', 'contains': {'type': 'integer'}}, 'contains'),
    ({'type': 'object', 'dependentRequired': {'a': ['b']}}, 'dependentRequired'),
    ({'type': 'string', 'format': 'uri-reference'}, 'uri-reference'),
    ({'type': 'object', 'x-guidance': {'lenient': True}}, 'x-guidance'),
    ({'oneOf': [{'type': 'integer'}, {'type': 'number'}]}, 'oneOf'),
])
def test_unsupported_schema_keyword_is_refused_by_name(compiler, schema, keyword):
    with pytest.raises(UnsupportedConstraint, match=re.escape(keyword)) as e:
        compiler.compile(ConstraintSpec.json_schema(schema))
    assert e.value.feature in (keyword, 'json_schema')


@pytest.mark.parametrize('parameters, keyword', [
    ({'type': 'object', 'properties': {'d': {'type': 'string', 'format': 'date'}}}, 'format'),
    ({'type': 'object', 'anyOf': [{'required': ['a']}]}, 'anyOf'),
    ({'type': 'object', 'properties': {'a': {'type': 'array', 'uniqueItems': True}}},
     'uniqueItems'),
])
def test_unsupported_tool_schema_is_refused_by_name(compiler, parameters, keyword):
    spec = ConstraintSpec.tool_call([{'name': 'f', 'parameters': parameters}])
    with pytest.raises(UnsupportedConstraint, match=keyword) as e:
        compiler.compile(spec)
    assert e.value.feature == keyword


def test_malformed_constraints_are_refused(compiler):
    for spec in (ConstraintSpec.regex('a('), ConstraintSpec.grammar('start: /a(/')):
        with pytest.raises(UnsupportedConstraint):
            compiler.compile(spec)
    with pytest.raises(UnsupportedConstraint, match='not JSON'):
        ConstraintSpec.json_schema({'type': 'number', 'maximum': float('nan')})
    with pytest.raises(UnsupportedConstraint, match='tool_choice'):
        ConstraintSpec.tool_call(TOOLS, name='nope')


def test_no_op_keyword_is_not_refused(compiler):
    compiler.compile(ConstraintSpec.json_schema({'type': 'array', 'uniqueItems': False}))


def test_gbnf_grammar_is_accepted(compiler, tokenizer):
    spec = ConstraintSpec.grammar('root ::= "ok" | "not " [a-z]')
    for tokens in sample([compiler.matcher(spec) for _ in range(20)], seed=7, cap=20):
        assert re.fullmatch('ok|not [a-z]', tokenizer.decode(tokens))


def test_compiled_grammars_are_cached_by_spec_and_tokenizer(tokenizer):
    compiler = ConstraintCompiler(tokenizer, VOCAB, STOPS, cache_size=2)
    a = {'type': 'object', 'properties': {'x': {'type': 'integer'}, 'y': {'type': 'integer'}}}
    b = {'type': 'object', 'properties': {'y': {'type': 'integer'}, 'x': {'type': 'integer'}}}
    first = compiler.compile(ConstraintSpec.json_schema(a))
    assert compiler.compile(ConstraintSpec.json_schema(json.loads(json.dumps(a)))) is first
    assert compiler.compile(ConstraintSpec.json_schema(b)) is not first  # another order
    compiler.compile(ConstraintSpec.json_object())  # evicts the least recently used: a
    assert compiler.compile(ConstraintSpec.json_schema(a)) is not first
    other = ConstraintCompiler(tokenizer, VOCAB + 32, STOPS)
    assert other.identity != compiler.identity


def test_reasoning_is_free_until_think_end_then_constrained(compiler, tokenizer):
    think_end, call = tokenizer.token_id('</think>'), tokenizer.token_id('<tool_call>')
    m = compiler.matcher(ConstraintSpec.json_schema(SCHEMAS['enums']), reasoning=True)
    bitmask = np.zeros((1, bitmask_words(VOCAB)), np.int32)
    m.fill(bitmask, 0)
    free = allowed(bitmask[0])
    assert free.sum() == 4096 - len(STOPS) - 1 and not free[[*STOPS, call]].any()
    assert all(m.accept(t) for t in tokenizer.encode('\n<think>not JSON at all }{'))
    assert not m.accept(STOPS[0])  # the answer must come
    assert m.accept(think_end)
    m.fill(bitmask, 0)
    assert allowed(bitmask[0]).sum() < 10 and not m.accept(tokenizer.encode('x')[0])
    [answer] = sample([m], seed=8, cap=600)
    jsonschema.validate(json.loads(tokenizer.decode(answer)), SCHEMAS['enums'])


@pytest.mark.parametrize('budget', [0, 7])
def test_reasoning_budget_forces_think_end(compiler, tokenizer, budget):
    spec = ConstraintSpec.json_schema(SCHEMAS['numbers and booleans'])
    think_end = tokenizer.token_id('</think>')
    matchers = [compiler.matcher(spec, reasoning=True, reasoning_budget=budget)
                for _ in range(50)]
    for tokens in sample(matchers, seed=9, cap=600):
        end = tokens.index(think_end)
        assert end <= budget
        answer = json.loads(tokenizer.decode(tokens[end + 1:]))
        jsonschema.validate(answer, SCHEMAS['numbers and booleans'])


def test_rollback_restores_the_mask(compiler, tokenizer):
    m = compiler.matcher(ConstraintSpec.json_schema(SCHEMAS['enums']), reasoning=True)
    bitmask = np.zeros((3, bitmask_words(VOCAB)), np.int32)
    thinking = tokenizer.encode('hmm')
    assert all(m.accept(t) for t in thinking)
    m.fill(bitmask, 0)
    answer = [tokenizer.token_id('</think>'), *tokenizer.encode('{"color"')]
    assert all(m.accept(t) for t in answer)
    m.fill(bitmask, 1)
    assert m.accept(tokenizer.encode(':')[0])
    m.rollback(1)
    m.fill(bitmask, 2)
    np.testing.assert_array_equal(bitmask[2], bitmask[1])
    m.rollback(len(answer))
    m.fill(bitmask, 2)
    np.testing.assert_array_equal(bitmask[2], bitmask[0])


def test_bitmask_of_the_wrong_shape_is_refused(compiler):
    m = compiler.matcher(ConstraintSpec.json_object())
    with pytest.raises(ValueError, match='bitmask'):
        m.fill(np.zeros((1, 128), np.int32), 0)


def test_apply_token_bitmask_matches_numpy():
    rng = np.random.default_rng(10)
    for V in (1, 100, VOCAB):
        bitmask = rng.integers(-2**31, 2**31, (3, bitmask_words(V)), dtype=np.int64)
        bitmask = bitmask.astype(np.int32)
        bitmask[0, -1] = -2**31  # only the sign bit: the 32nd token of the last word
        logits = rng.standard_normal((3, V)).astype(np.float32)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder='little')[:, :V]
        expected = np.where(bits.astype(bool), logits, -np.inf)
        got = jax.jit(apply_token_bitmask)(jnp.asarray(logits), jnp.asarray(bitmask))
        np.testing.assert_array_equal(np.asarray(got), expected)
        unchanged = apply_token_bitmask(jnp.asarray(logits), all_allowed_bitmask(3, V))
        np.testing.assert_array_equal(np.asarray(unchanged), logits)


def test_device_mask_and_categorical_draw(compiler, tokenizer):
    """The engine's path: host masks for a batch, applied to random logits in a jitted step."""
    spec = ConstraintSpec.json_schema(SCHEMAS['enums'])
    matchers = [compiler.matcher(spec) for _ in range(8)]
    step = jax.jit(lambda key, bitmask: jax.random.categorical(
        key, apply_token_bitmask(jax.random.normal(key, (8, VOCAB)), bitmask)))
    bitmask = np.asarray(all_allowed_bitmask(8, VOCAB))
    out = [[] for _ in matchers]
    for i in range(200):
        for r, m in enumerate(matchers):
            if not m.is_terminated():
                m.fill(bitmask, r)
        tokens = np.asarray(step(jax.random.key(i), bitmask))
        for r, m in enumerate(matchers):
            if not m.is_terminated():
                assert m.accept(int(tokens[r]))
                out[r].append(int(tokens[r]))
        if all(m.is_terminated() for m in matchers):
            break
    for tokens in out:
        assert tokens[-1] in STOPS
        jsonschema.validate(json.loads(tokenizer.decode(tokens[:-1])), SCHEMAS['enums'])
