"""The GLM output parser: expected fields, and streamed deltas that add up to the whole
result for every way of splitting the text."""

import json
import random

import pytest

from glmjax.serving.glm_parser import GlmOutputParser, parse

TOOLS = [
    {'type': 'function', 'function': {'name': 'get_weather', 'parameters': {
        'type': 'object', 'properties': {'city': {'type': 'string'}, 'days': {'type': 'integer'},
                                         'code': {'type': 'string'}}}}},
    {'type': 'function', 'function': {'name': 'get_time', 'parameters': {}}},
]

W = '<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{}</arg_value>\n</tool_call>'

# text -> (reasoning, content, [(name, arguments dict)])
CASES = {
    '\n<think>Let me think.</think>\nThe answer is 4.': ('Let me think.', 'The answer is 4.', []),
    '\nThe answer, without thinking.': ('', 'The answer, without thinking.', []),
    '\n<think></think>\nOnly content.': ('', 'Only content.', []),
    ('\n<think>need the weather</think>\nChecking.<tool_call>get_weather\n<arg_key>city'
     '</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3'
     '</arg_value>\n</tool_call>'):
        ('need the weather', 'Checking.', [('get_weather', {'city': 'Paris', 'days': 3})]),
    '<tool_call>get_time</tool_call>': ('', '', [('get_time', {})]),
    '\n<think>I should call<tool_call>get_time\n</tool_call>':
        ('I should call', '', [('get_time', {})]),
    W.format('Rome') + '\n' + W.format('Oslo'):
        ('', '', [('get_weather', {'city': 'Rome'}), ('get_weather', {'city': 'Oslo'})]),
    W.format('He said "hi"\n née \\ ok'):
        ('', '', [('get_weather', {'city': 'He said "hi"\n née \\ ok'})]),
    ('<tool_call>get_weather\n<arg_key>code</arg_key>\n<arg_value>007</arg_value>\n'
     '</tool_call>'): ('', '', [('get_weather', {'code': '007'})]),
    ('<tool_call>other\n<arg_key>obj</arg_key>\n<arg_value>{"a": [1, 2]}</arg_value>\n'
     '<arg_key>s</arg_key>\n<arg_value>not json</arg_value>\n</tool_call>'):
        ('', '', [('other', {'obj': {'a': [1, 2]}, 's': 'not json'})]),
    '<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Lim':
        ('', '', [('get_weather', {'city': 'Lim'})]),
    '<tool_call>get_weather\n<arg_key>days</arg_key>\n': ('', '', [('get_weather',
                                                                     {'days': None})]),
    'a < b, and <thinking> or </tool> are not tags <': (
        '', 'a < b, and <thinking> or </tool> are not tags <', []),
    '': ('', '', []),
    '\n<think>\nA\n\nB\n</think>\n\nC\n\nD\n': ('A\n\nB', 'C\n\nD', []),
}


def run(chunks, **kwargs):
    ids = iter(f'call_{i}' for i in range(100))
    parser = GlmOutputParser(TOOLS, new_id=lambda: next(ids), **kwargs)
    deltas = [parser.feed(c) for c in chunks] + [parser.finish()]
    return parser.result(), deltas


def merged(deltas):
    reasoning = ''.join(d.reasoning for d in deltas)
    content = ''.join(d.content for d in deltas)
    calls = {}
    for d in deltas:
        for c in d.tool_calls:
            if c.id is not None:
                assert c.index not in calls, 'a call announced twice'
                calls[c.index] = [c.id, c.name, '']
            calls[c.index][2] += c.arguments
    return reasoning, content, [tuple(calls[i]) for i in sorted(calls)]


def splits(text, rng):
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize('text', CASES)
def test_whole_text(text):
    reasoning, content, calls = CASES[text]
    result = parse(text, TOOLS)
    assert (result.reasoning, result.content) == (reasoning, content)
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == calls


@pytest.mark.parametrize('text', CASES)
def test_any_split_streams_the_same_result(text):
    rng = random.Random(0)
    whole, _ = run([text])
    expected = (whole.reasoning, whole.content,
                [(c.id, c.name, c.arguments) for c in whole.tool_calls])
    for chunks in splits(text, rng):
        result, deltas = run(chunks)
        assert merged(deltas) == expected, chunks
        assert (result.reasoning, result.content) == expected[:2]


def test_string_arguments_stream_before_the_call_ends():
    parser = GlmOutputParser(TOOLS)
    parser.feed('<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>San')
    d = parser.feed(' Francisco')
    assert d.tool_calls and d.tool_calls[0].arguments == ' Francisco'
    first = GlmOutputParser(TOOLS).feed('<tool_call>get_weather\n<arg_key>city</arg_key>')
    assert first.tool_calls[0].name == 'get_weather' and first.tool_calls[0].id


def test_prompt_opened_think_block():
    result = parse('weighing options</think>\nDone.', TOOLS, in_reasoning=True)
    assert (result.reasoning, result.content) == ('weighing options', 'Done.')
