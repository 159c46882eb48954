"""Parses GLM-4.x output into reasoning, content and tool calls, incrementally.

The model writes (GLM46 chat format):
    \\n<think>REASONING</think>\\nCONTENT<tool_call>NAME\\n<arg_key>K</arg_key>\\n
    <arg_value>V</arg_value>\\n</tool_call>...
Rules: text inside <think> is reasoning; a <tool_call> ends reasoning (a call made inside the
think block is still a call); text outside both is content; reasoning and content are
stripped of surrounding whitespace; a string-typed argument (by the tool's JSON schema) is
kept raw, any other is JSON-decoded (raw if it does not decode); zero-argument calls count.

`feed` may be called with any split of the text (one token, several tokens per step, single
characters): the deltas always add up to the result of parsing the whole text at once, and
string arguments stream as they arrive. Tags are recognised only whole: a suffix that could
be the start of a tag is held back until the next feed or `finish`.
"""

import dataclasses
import json
import uuid

THINK, END_THINK = '<think>', '</think>'
CALL, END_CALL = '<tool_call>', '</tool_call>'
KEY, END_KEY = '<arg_key>', '</arg_key>'
VALUE, END_VALUE = '<arg_value>', '</arg_value>'

# The tags each state looks for.
_TAGS = {
    'content': (THINK, END_THINK, CALL),
    'reasoning': (THINK, END_THINK, CALL),  # <think>: the model opening it again
    'name': ('\n', KEY, END_CALL),
    'body': (KEY, END_CALL),
    'key': (END_KEY,),
    'before_value': (VALUE,),
    'value': (END_VALUE,),
}


@dataclasses.dataclass
class ToolCallDelta:
    index: int
    arguments: str  # a fragment of the JSON arguments string
    id: str | None = None  # set on a call's first delta, with the name
    name: str | None = None


@dataclasses.dataclass
class Delta:
    reasoning: str = ''
    content: str = ''
    tool_calls: list[ToolCallDelta] = dataclasses.field(default_factory=list)

    def __bool__(self):
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON object as a string, as the OpenAI API carries it


@dataclasses.dataclass
class Parsed:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]


class _Stripped:
    """Streams text with surrounding whitespace removed: leading whitespace is dropped,
    trailing whitespace is held until more text proves it is not trailing."""

    def __init__(self):
        self.started, self.pending, self.text = False, '', ''

    def push(self, s: str) -> str:
        if not self.started:
            s = s.lstrip()
            if not s:
                return ''
            self.started = True
        body = s.rstrip()
        if not body:
            self.pending += s
            return ''
        out = self.pending + body
        self.pending = s[len(body):]
        self.text += out
        return out


def _held_suffix(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of a tag."""
    for n in range(min(len(buf), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(buf[-n:]) for t in tags):
            return n
    return 0


def _types(tools: list[dict] | None) -> dict[str, dict[str, str]]:
    """tool name -> argument name -> JSON schema type, from OpenAI-style tool definitions."""
    out = {}
    for tool in tools or []:
        fn = tool.get('function', tool)
        props = (fn.get('parameters') or {}).get('properties') or {}
        out[fn.get('name', '')] = {k: (v or {}).get('type') for k, v in props.items()}
    return out


class GlmOutputParser:
    def __init__(self, tools: list[dict] | None = None, in_reasoning: bool = False,
                 new_id=lambda: f'call_{uuid.uuid4().hex[:24]}'):
        """in_reasoning: the prompt itself opened the think block."""
        self.types = _types(tools)
        self.new_id = new_id
        self.state = 'reasoning' if in_reasoning else 'content'
        self.buf = ''
        self.reasoning, self.content = _Stripped(), _Stripped()
        self.calls: list[ToolCall] = []
        self.acc = ''  # the name, key or non-string value being read
        self.string_value = False
        self.n_args = 0

    def feed(self, text: str) -> Delta:
        self.buf += text
        delta = Delta()
        while self.buf:
            tags = _TAGS[self.state]
            hits = [(self.buf.find(t), t) for t in tags]
            hits = [(i, t) for i, t in hits if i >= 0]
            if hits:
                i, tag = min(hits)
                self._text(self.buf[:i], delta)
                self.buf = self.buf[i + len(tag):]
                self._tag(tag, delta)
                continue
            keep = _held_suffix(self.buf, tags)
            self._text(self.buf[:len(self.buf) - keep], delta)
            self.buf = self.buf[len(self.buf) - keep:]
            break
        return delta

    def finish(self) -> Delta:
        """End of output: held text is plain text; an unfinished call is closed."""
        delta = Delta()
        self._text(self.buf, delta)
        self.buf = ''
        if self.state == 'name':
            self._start_call(delta)
        if self.state == 'before_value':  # a key without its value
            self._emit(delta, 'null')
        if self.state == 'value':
            self._end_value(delta)
        if self.state in ('name', 'body', 'key', 'before_value', 'value'):
            self._end_call(delta)
        return delta

    def result(self) -> Parsed:
        return Parsed(self.reasoning.text, self.content.text, list(self.calls))

    # Text between tags, by state.
    def _text(self, s: str, delta: Delta):
        if not s:
            return
        if self.state == 'content':
            delta.content += self.content.push(s)
        elif self.state == 'reasoning':
            delta.reasoning += self.reasoning.push(s)
        elif self.state in ('name', 'key') or (self.state == 'value' and not self.string_value):
            self.acc += s
        elif self.state == 'value':
            self._emit(delta, json.dumps(s, ensure_ascii=False)[1:-1])
        # Whitespace between arguments ('body', 'before_value') is layout, not data.

    def _tag(self, tag: str, delta: Delta):
        s = self.state
        if tag == THINK:
            self.state = 'reasoning'
        elif tag == END_THINK:
            self.state = 'content'
        elif tag == CALL:
            self.state, self.acc, self.n_args = 'name', '', 0
        elif s == 'name':
            self._start_call(delta)
            self.state = {'\n': 'body', KEY: 'key', END_CALL: 'body'}[tag]
            if tag == END_CALL:
                self._end_call(delta)
        elif tag == KEY:
            self.state, self.acc = 'key', ''
        elif tag == END_KEY:
            self._start_value(delta)
        elif tag == VALUE:
            self.state = 'value'
            if self.string_value:
                self._emit(delta, '"')
        elif tag == END_VALUE:
            self._end_value(delta)
        elif tag == END_CALL:
            self._end_call(delta)

    def _emit(self, delta: Delta, fragment: str):
        call = self.calls[-1]
        call.arguments += fragment
        if delta.tool_calls and delta.tool_calls[-1].index == len(self.calls) - 1:
            delta.tool_calls[-1].arguments += fragment
        else:
            delta.tool_calls.append(ToolCallDelta(len(self.calls) - 1, fragment))

    def _start_call(self, delta: Delta):
        call = ToolCall(self.new_id(), self.acc.strip(), '')
        self.calls.append(call)
        delta.tool_calls.append(ToolCallDelta(len(self.calls) - 1, '', call.id, call.name))
        self.acc = ''

    def _start_value(self, delta: Delta):
        key = self.acc.strip()
        self._emit(delta, ('{' if self.n_args == 0 else ', ') + json.dumps(key, ensure_ascii=False)
                   + ': ')
        self.n_args += 1
        self.string_value = self.types.get(self.calls[-1].name, {}).get(key) == 'string'
        self.state, self.acc = 'before_value', ''

    def _end_value(self, delta: Delta):
        if self.string_value:
            self._emit(delta, '"')
        else:
            try:
                value = json.loads(self.acc)
            except json.JSONDecodeError:
                value = self.acc
            self._emit(delta, json.dumps(value, ensure_ascii=False))
        self.state, self.acc = 'body', ''

    def _end_call(self, delta: Delta):
        self._emit(delta, '}' if self.n_args else '{}')
        self.state = 'content'


def parse(text: str, tools: list[dict] | None = None, **kwargs) -> Parsed:
    parser = GlmOutputParser(tools, **kwargs)
    parser.feed(text)
    parser.finish()
    return parser.result()
