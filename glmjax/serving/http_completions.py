"""POST /v1/completions: text (or token ids) in, text out, `n` choices per prompt."""

import asyncio
import time
import uuid

from glmjax.serving import contract
from glmjax.serving import openai_types as T
from glmjax.serving.http_common import (
    ApiError,
    Backend,
    close_all,
    gen_requests,
    no_surrogates,
    output_constraint,
    prompts_of,
    sse,
    usage,
)
from glmjax.serving.http_moderation import Moderator
from glmjax.serving.metrics import Metrics
from glmjax.serving.moderation import conversation


async def completions(backend: Backend, metrics: Metrics, body: T.CompletionRequest):
    no_surrogates(body.model_dump(exclude_unset=True, by_alias=True), '')
    moderator = Moderator.of(backend, body.safety_model)
    constraint = output_constraint(body)
    if body.suffix:
        raise ApiError(400, 'suffix is not supported: GLM-4.6 has no fill-in-the-middle mode',
                       'suffix')
    prompts = await asyncio.to_thread(prompts_of, backend, body.prompt, 'prompt')
    if len(prompts) * body.n > contract.MAX_N:
        raise ApiError(400, f'{len(prompts)} prompts x n={body.n} is more than '
                       f'{contract.MAX_N} choices', 'prompt')
    rid, created = f'cmpl-{uuid.uuid4().hex}', int(time.time())

    def checked():  # off the event loop: a constraint is compiled here
        requests, owners = [], []
        for p in prompts:
            # A raw prompt that opens GLM's assistant turn leaves the model reasoning first,
            # as a chat prompt with thinking on does: the constraint applies after </think>.
            reasoning = constraint is not None and contract.starts_in_reasoning(
                backend.decode(p))
            for r in gen_requests(backend, body, p, body.max_tokens, body.logprobs, 'prompt',
                                  constraint, reasoning):
                requests.append(r)
                owners.append(p)
        return requests, owners

    requests, owners = await asyncio.to_thread(checked)
    if moderator is not None:  # what the classifier reads, per prompt
        said = {id(p): conversation('', [('user', backend.decode(p))]) for p in prompts}
        for p in prompts:
            await moderator.check_prompt(said[id(p)])
    handles = backend.generate_all(requests)
    jobs = [(p, metrics.track(h, len(p))) for p, h in zip(owners, handles)]
    if moderator is not None:
        jobs = [(p, moderator.guard(s, said[id(p)], whole=not body.stream)) for p, s in jobs]
    n_prompt = sum(len(p) for p in prompts) * body.n

    if body.stream:
        async def chunks():
            total, cached = 0, [0] * len(jobs)
            for index, (p, stream) in enumerate(jobs):
                if body.echo:
                    yield _text_chunk(rid, created, backend, index, backend.decode(p), None)
                async for e in stream:
                    total += len(e.token_ids)
                    cached[index] = e.cached_tokens or cached[index]
                    yield _text_chunk(rid, created, backend, index, e.text, e.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield {'id': rid, 'object': 'text_completion', 'created': created,
                       'model': backend.model_name, 'choices': [],
                       'usage': usage(n_prompt, total, sum(cached))}
        return sse(chunks(), handles)

    cached = [0] * len(jobs)

    async def collect(index, p, stream):
        text, n, finish, lps = '', 0, None, []
        async for e in stream:
            cached[index] = e.cached_tokens or cached[index]
            text += e.text
            n += len(e.token_ids)
            finish = e.finish_reason or finish
            lps += e.logprobs or []
        choice = {'index': index, 'text': (backend.decode(p) if body.echo else '') + text,
                  'finish_reason': finish, 'logprobs': None, '_tokens': n}
        if body.logprobs is not None:
            choice['logprobs'] = {
                'tokens': [backend.decode([t.token_id]) for t in lps],
                'token_logprobs': [t.logprob for t in lps],
                'top_logprobs': [{backend.decode([i]): lp for i, lp in t.top} for t in lps]}
        return choice

    try:
        choices = await asyncio.gather(*[collect(i, p, s) for i, (p, s) in enumerate(jobs)])
    finally:
        await close_all(handles)
    completion = sum(c.pop('_tokens') for c in choices)
    return {'id': rid, 'object': 'text_completion', 'created': created,
            'model': backend.model_name, 'choices': choices,
            'usage': usage(n_prompt, completion, sum(cached))}


def _text_chunk(rid, created, backend, index, text, finish):
    return {'id': rid, 'object': 'text_completion', 'created': created,
            'model': backend.model_name,
            'choices': [{'index': index, 'text': text, 'finish_reason': finish,
                         'logprobs': None}]}
