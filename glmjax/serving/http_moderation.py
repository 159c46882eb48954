"""`safety_model` on the HTTP front: the checks of glmjax/serving/moderation.py, run through the
async backend, their refusals as OpenAI-style errors."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from glmjax.serving.http_common import ApiError, Backend, GenEvent, compiler_of, limits
from glmjax.serving.moderation import (
    Classifier,
    Moderation,
    Refusal,
    Screen,
    category,
    conversation,
)


def _api_error(e: Refusal) -> ApiError:
    return ApiError(400, str(e), 'safety_model', e.code)


class Moderator:
    """The checks of one request whose `safety_model` names the served model."""

    def __init__(self, backend: Backend, classifier: Classifier):
        self.backend, self.classifier = backend, classifier

    @classmethod
    def of(cls, backend: Backend, name: str | None) -> 'Moderator | None':
        """None without a safety_model; a 400 for one this server cannot be."""
        try:
            classifier = Classifier.of(
                name, backend.served_names,
                moderation=getattr(backend, 'moderation', None) or Moderation.load(),
                chat_template=backend.chat_template, encode=backend.encode,
                limits=limits(backend), compiler=compiler_of(backend))
        except Refusal as e:
            raise _api_error(e) from None
        return None if classifier is None else cls(backend, classifier)

    async def verdict(self, stage: str, content: str) -> str | None:
        """The category if `content` is unsafe at this stage, else None."""
        try:
            request = await asyncio.to_thread(self.classifier.request, stage, content)
        except Refusal as e:
            raise _api_error(e) from None
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
            raise _api_error(self.classifier.unsafe_prompt(found))

    def guard(self, events: AsyncIterator[GenEvent], prompt: str,
              whole: bool) -> AsyncIterator[GenEvent]:
        """One choice's events, passed on only once the answer so far is classified safe
        (whole, a response sent in one piece: at its end; a stream: every stream_window
        tokens). Unsafe: the request stops, and its last event says 'content_filter' and
        carries no text (its tokens, for usage)."""
        screen = Screen(None if whole else self.classifier.moderation.stream_window)

        async def guarded():
            async for e in events:
                final = e.finish_reason is not None
                due = screen.push(e, e.text, len(e.token_ids), final)
                if due is not None:
                    found = await self.verdict('response', conversation(
                        prompt, [('assistant', due)]))
                    if found is not None:
                        if hasattr(events, 'aclose'):
                            await events.aclose()  # cut short: the request stops
                        held = screen.held
                        yield dataclasses.replace(
                            held[-1], token_ids=[t for h in held for t in h.token_ids],
                            text='', logprobs=None, finish_reason='content_filter')
                        return
                if due is not None or final:
                    for h in screen.passed():
                        yield h
        return guarded()
