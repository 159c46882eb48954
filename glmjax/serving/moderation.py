"""`safety_model`: the served model itself classifies a request's prompt before it is answered,
and then the answer before it is returned (Together's field, which names the classifier).
This module is what both fronts share; the HTTP front runs it in
glmjax/serving/http_moderation.py, gRPC in glmjax/serving/service.py.

The classifier's instructions are a JSON file users can replace (`glmjax-serve
--moderation_prompt`; the default is moderation.json beside this module): a `system` message,
per stage (`prompt`, `response`) a `user` message in which `{content}` is the conversation
so far, the `choices` the verdict is constrained to (a stage may have its own): "safe",
or "unsafe" with a category after a colon ("unsafe: violence"), and `stream_window`, how
many tokens of a streamed answer are classified at a time. The verdict is decoded greedily
under a choice constraint (glmjax/serving/constraints.py), so it is always one of them.

An unsafe prompt is refused (HTTP 400 whose code is `content_policy_violation`, gRPC
INVALID_ARGUMENT), naming the category. An unsafe answer ends with the finish reason
`content_filter` and none of its unchecked text: a response sent whole is classified once,
at its end; a stream is held back and classified every `stream_window` tokens (the whole
answer so far each time, which the prefix cache mostly has already), and only text
classified safe is sent, so a client never sees text the classifier did not pass.

The verdict is as good as the model: GLM-4.6 follows such instructions, the demo model was
never trained to, so its verdicts mean nothing.
"""

import dataclasses
import json
import os
from collections.abc import Callable

from glmjax.serving import contract
from glmjax.serving.chat import ChatTemplate
from glmjax.serving.constraints import ConstraintCompiler, ConstraintSpec
from glmjax.serving.contract import GenRequest, InvalidRequest, Limits

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'moderation.json')
STAGES = ('prompt', 'response')
STREAM_WINDOW = 64  # tokens of a streamed answer per verdict, unless the file says


class Refusal(Exception):
    """safety_model refuses the request, or cannot be honoured; `code` in OpenAI's words."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Moderation:
    system: str
    user: dict[str, str]  # stage -> the user message, '{content}' in it
    choices: dict[str, tuple[str, ...]]  # stage -> the verdicts it may give
    stream_window: int = STREAM_WINDOW

    @classmethod
    def load(cls, path: str | None = None) -> 'Moderation':
        """The moderation file; a ValueError says what is wrong with it."""
        path = path or DEFAULT_FILE
        try:
            with open(path, encoding='utf-8') as f:
                spec = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f'moderation prompt {path}: {e}') from None
        return cls.parse(spec, path)

    @classmethod
    def parse(cls, spec, where: str = 'moderation prompt') -> 'Moderation':
        def fail(message):
            raise ValueError(f'{where}: {message}')
        if not isinstance(spec, dict):
            fail('must be a JSON object')
        system = spec.get('system', '')
        if not isinstance(system, str):
            fail('"system" must be a string')
        window = spec.get('stream_window', STREAM_WINDOW)
        if type(window) is not int or window < 1:
            fail(f'"stream_window" must be a whole number of tokens >= 1, got {window!r}')
        user, choices = {}, {}
        for stage in STAGES:
            part = spec.get(stage)
            if not isinstance(part, dict) or not isinstance(part.get('user'), str) \
                    or '{content}' not in part['user']:
                fail(f'"{stage}" must be an object whose "user" string holds {{content}}')
            user[stage] = part['user']
            options = part.get('choices', spec.get('choices'))
            if not isinstance(options, list) or not options or not all(
                    isinstance(c, str) and (c == 'safe' or c.startswith('unsafe'))
                    for c in options):
                fail(f'the choices of "{stage}" must be a list of "safe" and "unsafe: '
                     f'<category>" strings, got {options!r}')
            choices[stage] = tuple(options)
        return cls(system, user, choices, window)

    def messages(self, stage: str, content: str) -> list[dict]:
        user = self.user[stage].replace('{content}', content)
        return ([{'role': 'system', 'content': self.system}] if self.system else []) + [
            {'role': 'user', 'content': user}]


def category(verdict: str) -> str | None:
    """None for "safe", else the category of an "unsafe" verdict ("unsafe" alone: "unsafe")."""
    if verdict == 'safe':
        return None
    return verdict.partition(':')[2].strip() or 'unsafe'


def conversation(before: str, turns: list[tuple[str, str]]) -> str:
    """What the classifier reads: `before`, then one "role: text" paragraph per turn."""
    return '\n\n'.join([before] * bool(before) + [f'{role}: {text}' for role, text in turns])


@dataclasses.dataclass(frozen=True)
class Classifier:
    """The checks of one request whose `safety_model` names the served model: the requests
    that ask for a verdict (the front runs them) and what a verdict means."""
    name: str
    moderation: Moderation
    chat_template: ChatTemplate
    encode: Callable[[str], list[int]]
    limits: Limits
    compiler: ConstraintCompiler | None

    @classmethod
    def of(cls, name: str | None, served_names: tuple[str, ...], **kwargs) -> 'Classifier | None':
        """None without a safety_model; Refusal for one this server cannot be."""
        if name is None:
            return None
        if name not in served_names:
            raise Refusal(f'safety_model {name!r} is not served here; it can name '
                          f'{", ".join(repr(n) for n in served_names)}', 'model_not_found')
        return cls(name, **kwargs)

    def request(self, stage: str, content: str) -> GenRequest:
        """The greedy, choice-constrained request for `content`'s verdict at `stage`."""
        choices = self.moderation.choices[stage]
        text = self.chat_template.render(self.moderation.messages(stage, content),
                                         enable_thinking=False)
        ids = self.encode(text)
        longest = max(len(self.encode(c)) for c in choices)
        r = GenRequest(prompt_ids=ids, max_tokens=longest + 1, temperature=0.0,
                       constraint=ConstraintSpec.choice(choices))
        if len(ids) + r.max_tokens > self.limits.max_seq_len:
            raise Refusal(f'safety_model: the {stage} to classify makes a moderation prompt '
                          f'of {len(ids)} tokens, more than the context of '
                          f'{self.limits.max_seq_len} leaves for the verdict',
                          'context_length_exceeded')
        try:
            contract.check(r, self.limits, compiler=self.compiler)
        except InvalidRequest as e:
            raise Refusal(f'safety_model: {e}') from None
        return r

    def unsafe_prompt(self, found: str) -> Refusal:
        return Refusal(f'the prompt was classified unsafe ({found}) by safety_model '
                       f'{self.name!r}; it is not answered', 'content_policy_violation')


class Screen:
    """One answer on its way out, held back until the classifier has passed it: every
    `window` tokens (None: only at the end, for an answer sent whole)."""

    def __init__(self, window: int | None):
        self.window = window
        self.answer = ''  # all of it so far
        self.classified = ''  # what the last verdict passed
        self.held: list = []  # the events not yet passed on
        self.held_tokens = 0

    def push(self, event, text: str, tokens: int, final: bool) -> str | None:
        """Holds `event`; returns the answer to classify now (all of it so far), or None:
        hold on, or (on the final event, when nothing new came since) pass it."""
        self.answer += text
        self.held.append(event)
        self.held_tokens += tokens
        if final and self.answer == self.classified:
            return None
        if final or (self.window is not None and self.held_tokens >= self.window):
            return self.answer
        return None

    def passed(self) -> list:
        """The held events, free to go now that the answer so far was classified safe."""
        self.classified = self.answer
        out, self.held, self.held_tokens = self.held, [], 0
        return out
