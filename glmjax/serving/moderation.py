"""`safety_model`: the served model itself classifies a request's prompt before it is answered,
and then the answer before it is returned (Together's field, which names the classifier).

The classifier's instructions are a JSON file users can replace (`glmjax-serve
--moderation_prompt`; the default is moderation.json beside this module): a `system` message,
per stage (`prompt`, `response`) a `user` message in which `{content}` is the conversation
so far, and the `choices` the verdict is constrained to (a stage may have its own): "safe",
or "unsafe" with a category after a colon ("unsafe: violence"). The verdict is decoded
greedily under a choice constraint (glmjax/serving/constraints.py), so it is always one of
them.

An unsafe prompt is refused with a 400 whose code is `content_policy_violation` and whose
message names the category. An unsafe answer ends with `finish_reason: "content_filter"`:
a whole response then carries none of its text; a stream has already sent all but its last
delta, which is dropped.

The verdict is as good as the model: GLM-4.6 follows such instructions, the demo model was
never trained to, so its verdicts mean nothing.
"""

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator

from glmjax.serving import contract
from glmjax.serving.constraints import ConstraintSpec
from glmjax.serving.contract import GenRequest, InvalidRequest
from glmjax.serving.http_common import (
    ApiError,
    Backend,
    GenEvent,
    compiler_of,
    limits,
)

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'moderation.json')
STAGES = ('prompt', 'response')


@dataclasses.dataclass(frozen=True)
class Moderation:
    system: str
    user: dict[str, str]  # stage -> the user message, '{content}' in it
    choices: dict[str, tuple[str, ...]]  # stage -> the verdicts it may give

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
        return cls(system, user, choices)

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


class Moderator:
    """The checks of one request whose `safety_model` names the served model."""

    def __init__(self, backend: Backend, name: str, moderation: Moderation):
        self.backend, self.name, self.moderation = backend, name, moderation

    @classmethod
    def of(cls, backend: Backend, name: str | None) -> 'Moderator | None':
        """None without a safety_model; a 400 for one this server cannot be."""
        if name is None:
            return None
        if name not in backend.served_names:
            raise ApiError(400, f'safety_model {name!r} is not served here; it can name '
                           f'{", ".join(repr(n) for n in backend.served_names)}',
                           'safety_model', 'model_not_found')
        moderation = getattr(backend, 'moderation', None) or Moderation.load()
        return cls(backend, name, moderation)

    def _request(self, stage: str, content: str) -> GenRequest:
        choices = self.moderation.choices[stage]
        text = self.backend.chat_template.render(self.moderation.messages(stage, content),
                                                 enable_thinking=False)
        ids = self.backend.encode(text)
        longest = max(len(self.backend.encode(c)) for c in choices)
        r = GenRequest(prompt_ids=ids, max_tokens=longest + 1, temperature=0.0,
                       constraint=ConstraintSpec.choice(choices))
        if len(ids) + r.max_tokens > self.backend.max_context:
            raise ApiError(400, f'safety_model: the {stage} to classify makes a moderation '
                           f'prompt of {len(ids)} tokens, more than the context of '
                           f'{self.backend.max_context} leaves for the verdict',
                           'safety_model', 'context_length_exceeded')
        try:
            contract.check(r, limits(self.backend), compiler=compiler_of(self.backend))
        except InvalidRequest as e:
            raise ApiError(400, f'safety_model: {e}', 'safety_model') from None
        return r

    async def verdict(self, stage: str, content: str) -> str | None:
        """The category if `content` is unsafe at this stage, else None."""
        request = await asyncio.to_thread(self._request, stage, content)
        [events] = self.backend.generate_all([request])
        try:
            text = ''.join([e.text async for e in events])
        finally:
            if hasattr(events, 'aclose'):
                await events.aclose()
        return category(text.strip())

    async def check_prompt(self, content: str) -> None:
        found = await self.verdict('prompt', content)
        if found is not None:
            raise ApiError(400, f'the prompt was classified unsafe ({found}) by safety_model '
                           f'{self.name!r}; it is not answered', 'safety_model',
                           'content_policy_violation')

    def guard(self, events: AsyncIterator[GenEvent], prompt: str,
              whole: bool) -> AsyncIterator[GenEvent]:
        """One choice's events, its answer classified when it ends. Unsafe: the last event
        says 'content_filter' and carries no text. whole (a response sent in one piece):
        nothing is passed on before the verdict, and nothing of an unsafe answer."""
        async def guarded():
            answer, held, tokens = '', [], []
            async for e in events:
                answer += e.text
                tokens += e.token_ids
                if e.finish_reason is None:
                    if whole:
                        held.append(e)
                    else:
                        yield e
                    continue
                found = await self.verdict('response', conversation(prompt,
                                                                    [('assistant', answer)]))
                if found is None:
                    for h in held:
                        yield h
                    yield e
                else:
                    yield dataclasses.replace(e, token_ids=tokens if whole else e.token_ids,
                                              text='', logprobs=None,
                                              finish_reason='content_filter')
        return guarded()
