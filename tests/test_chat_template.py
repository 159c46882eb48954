"""Chat rendering in the GLM-4.6 format, as transformers renders templates."""

import json

import pytest

from glmjax.serving.chat import DEFAULT_TEMPLATE, ChatError, ChatTemplate
from glmjax.serving.glm_parser import parse

TOOLS = [{'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'Weather by city, «ünïcode»',
    'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'},
                                                     'days': {'type': 'integer'}}}}}]


@pytest.fixture(scope='module')
def glm():
    with open(DEFAULT_TEMPLATE) as f:
        return ChatTemplate(f.read())


def test_single_turn_thinking_on_and_off(glm):
    msgs = [{'role': 'user', 'content': 'Hi'}]
    assert glm.render(msgs) == '[gMASK]<sop><|user|>\nHi<|assistant|>'
    assert glm.render(msgs, enable_thinking=False) == (
        '[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>')
    assert glm.render(msgs, add_generation_prompt=False) == '[gMASK]<sop><|user|>\nHi'


def test_tools_block_then_user_system_message(glm):
    out = glm.render([{'role': 'system', 'content': 'Be brief.'},
                      {'role': 'user', 'content': 'Weather?'}], tools=TOOLS)
    head = '[gMASK]<sop><|system|>\n# Tools\n\n'
    assert out.startswith(head)
    tools_line = out.split('<tools>\n')[1].split('\n</tools>')[0]
    assert json.loads(tools_line) == TOOLS[0]
    assert '«ünïcode»' in tools_line  # not \u-escaped
    assert out.endswith('</tool_call><|system|>\nBe brief.<|user|>\nWeather?<|assistant|>')


def test_multi_turn_tool_calls_and_results(glm):
    msgs = [
        {'role': 'user', 'content': 'Paris and Oslo?'},
        {'role': 'assistant', 'content': 'Checking.', 'reasoning_content': 'two calls',
         'tool_calls': [
             {'id': 'a', 'type': 'function',
              'function': {'name': 'get_weather', 'arguments': '{"city": "Paris", "days": 3}'}},
             {'id': 'b', 'type': 'function',
              'function': {'name': 'get_weather', 'arguments': '{"city": "Oslo"}'}}]},
        {'role': 'tool', 'tool_call_id': 'a', 'content': 'sunny'},
        {'role': 'tool', 'tool_call_id': 'b', 'content': 'rain'},
    ]
    out = glm.render(msgs, tools=TOOLS)
    assert out.split('<|user|>\n')[1] == (
        'Paris and Oslo?<|assistant|>\n<think>two calls</think>\nChecking.'
        '\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n'
        '<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>'
        '\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n'
        '</tool_call><|observation|>\n<tool_response>\nsunny\n</tool_response>'
        '\n<tool_response>\nrain\n</tool_response><|assistant|>')


def test_reasoning_kept_only_after_the_last_user_turn(glm):
    msgs = [{'role': 'user', 'content': 'a'},
            {'role': 'assistant', 'content': 'b', 'reasoning_content': 'old thoughts'},
            {'role': 'user', 'content': [{'type': 'text', 'text': 'c'}]},
            {'role': 'assistant', 'content': 'd', 'reasoning': 'new thoughts'}]
    out = glm.render(msgs, add_generation_prompt=False)
    assert out == ('[gMASK]<sop><|user|>\na<|assistant|>\n<think></think>\nb<|user|>\nc'
                   '<|assistant|>\n<think>new thoughts</think>\nd')


def test_rendered_assistant_turn_parses_back(glm):
    """The template and the output parser agree on the format."""
    call = {'id': 'x', 'type': 'function',
            'function': {'name': 'get_weather', 'arguments': '{"city": "Rome", "days": 2}'}}
    msgs = [{'role': 'user', 'content': 'q'},
            {'role': 'assistant', 'content': 'Let me look.', 'reasoning_content': 'think',
             'tool_calls': [call]}]
    turn = glm.render(msgs, add_generation_prompt=False).split('<|assistant|>')[1]
    parsed = parse(turn, TOOLS)
    assert (parsed.reasoning, parsed.content) == ('think', 'Let me look.')
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ('get_weather', {'city': 'Rome', 'days': 2})]


def test_checkpoint_template_takes_precedence(tmp_path, glm):
    assert ChatTemplate.from_dir(str(tmp_path)).render(
        [{'role': 'user', 'content': 'x'}]) == glm.render([{'role': 'user', 'content': 'x'}])
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
        {'chat_template': '{% for m in messages %}[{{ m.content }}]{% endfor %}'}))
    assert ChatTemplate.from_dir(str(tmp_path)).render([{'role': 'user', 'content': 'x'}]) == '[x]'
    (tmp_path / 'chat_template.jinja').write_text('{{ messages | length }}')
    assert ChatTemplate.from_dir(str(tmp_path)).render([{'role': 'user', 'content': 'x'}]) == '1'


def test_errors_name_the_problem(glm):
    bad = [{'role': 'assistant', 'tool_calls': [
        {'function': {'name': 'f', 'arguments': '{not json'}}]}]
    with pytest.raises(ChatError, match=r'tool_calls\[0\].function.arguments is not valid JSON'):
        glm.render(bad)
    with pytest.raises(ChatError, match='does not compile'):
        ChatTemplate('{% for %}')
    with pytest.raises(ChatError, match='only users speak'):
        ChatTemplate("{{ raise_exception('only users speak') }}").render([])
    with pytest.raises(ChatError, match='chat template failed'):
        ChatTemplate('{{ messages.__class__.__mro__ }}{{ "".__class__.mro()[1] }}').render([])
