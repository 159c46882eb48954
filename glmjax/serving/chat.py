"""Chat templates: a checkpoint's own `chat_template.jinja`, rendered as transformers does
(sandboxed jinja2, trim_blocks and lstrip_blocks, `tojson` keeping non-ASCII), so that any
GLM checkpoint's template works unchanged."""

import json
import os

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = os.path.join(os.path.dirname(__file__), 'glm46_chat_template.jinja')


class ChatError(ValueError):
    """A conversation the template cannot render; the message says which part."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message):
    raise ChatError(message)


class ChatTemplate:
    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters['tojson'] = _tojson
        env.globals['raise_exception'] = _raise
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(f'chat template does not compile: {e}') from None

    @classmethod
    def from_dir(cls, path: str) -> 'ChatTemplate':
        """chat_template.jinja, else tokenizer_config.json's chat_template, else the GLM-4.6
        format."""
        file = os.path.join(path, 'chat_template.jinja')
        if os.path.exists(file):
            with open(file) as f:
                return cls(f.read())
        config = os.path.join(path, 'tokenizer_config.json')
        if os.path.exists(config):
            with open(config) as f:
                source = json.load(f).get('chat_template')
            if isinstance(source, str):
                return cls(source)
        return cls.default()

    @classmethod
    def default(cls) -> 'ChatTemplate':
        """The GLM-4.6 format."""
        with open(DEFAULT_TEMPLATE) as f:
            return cls(f.read())

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **kwargs) -> str:
        try:
            return self.template.render(messages=[normalize(m) for m in messages],
                                        tools=tools or None,
                                        add_generation_prompt=add_generation_prompt, **kwargs)
        except jinja2.TemplateError as e:
            raise ChatError(f'chat template failed: {e}') from None


def normalize(message: dict) -> dict:
    """OpenAI message -> what GLM templates read: tool-call arguments as dicts (the API
    carries them as JSON strings), reasoning under `reasoning_content`."""
    m = dict(message)
    if m.get('reasoning') and not m.get('reasoning_content'):
        m['reasoning_content'] = m['reasoning']
    calls = []
    for i, call in enumerate(m.get('tool_calls') or []):
        fn = dict(call.get('function') or {})
        args = fn.get('arguments')
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ChatError(f'tool_calls[{i}].function.arguments is not valid JSON: '
                                f'{e}') from None
        if args is not None and not isinstance(args, dict):
            raise ChatError(f'tool_calls[{i}].function.arguments must be a JSON object')
        fn['arguments'] = args or {}
        calls.append({**call, 'function': fn})
    if calls:
        m['tool_calls'] = calls
    return m
