"""POST /v1/chat/completions: messages rendered with the checkpoint's chat template, generated,
and parsed into reasoning, content and tool calls (glmjax/serving/glm_parser.py)."""

import asyncio
import json
import time
import uuid

from glmjax.serving import contract
from glmjax.serving import openai_types as T
from glmjax.serving.chat import ChatError
from glmjax.serving.constraints import ConstraintSpec, UnsupportedConstraint
from glmjax.serving.glm_parser import GlmOutputParser
from glmjax.serving.http_common import (
    MAX_TOOLS,
    MAX_TOOLS_CHARS,
    MEDIA_PARTS,
    ApiError,
    Backend,
    Constraint,
    TokenLogprob,
    close_all,
    gen_requests,
    no_surrogates,
    output_constraint,
    sse,
    usage,
)
from glmjax.serving.http_moderation import Moderator
from glmjax.serving.metrics import Metrics
from glmjax.serving.moderation import conversation

ROLES = ('system', 'developer', 'user', 'assistant', 'tool')


RESERVED_TEMPLATE_ARGS = ('messages', 'tools', 'add_generation_prompt')


def _check_messages(messages: list[dict]) -> list[dict]:
    """Checks each message; returns them with OpenAI's `developer` role read as `system`."""
    out = []
    for i, m in enumerate(messages):
        role = m.get('role')
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f'messages[{i}].role must be one of {", ".join(ROLES)}, got '
                           f'{role!r}', f'messages[{i}].role')
        content = m.get('content')
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get('type') if isinstance(part, dict) else None
                if isinstance(kind, str) and kind in MEDIA_PARTS:
                    raise ApiError(400, f'messages[{i}].content[{j}]: {MEDIA_PARTS[kind]} input '
                                   'is not supported: GLM-4.6 is a text-only model',
                                   f'messages[{i}].content[{j}]', 'unsupported_modality')
                if kind != 'text' or not isinstance(part.get('text'), str):
                    raise ApiError(400, f'messages[{i}].content[{j}] must be a text part '
                                   '({"type": "text", "text": "..."})',
                                   f'messages[{i}].content[{j}]')
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f'messages[{i}].content must be a string or a list of parts',
                           f'messages[{i}].content')
        if role in ('user', 'system', 'developer') and not content:
            raise ApiError(400, f'messages[{i}] ({role}) has no content',
                           f'messages[{i}].content')
        if role == 'tool' and not isinstance(m.get('tool_call_id'), str):
            raise ApiError(400, f'messages[{i}] (tool) needs a tool_call_id',
                           f'messages[{i}].tool_call_id')
        for key in ('reasoning', 'reasoning_content', 'name'):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ApiError(400, f'messages[{i}].{key} must be a string',
                               f'messages[{i}].{key}')
        _check_tool_calls(m.get('tool_calls'), f'messages[{i}].tool_calls')
        out.append({**m, 'role': 'system'} if role == 'developer' else m)
    return out


def _check_tool_calls(calls, where: str):
    if calls is None:
        return
    if not isinstance(calls, list):
        raise ApiError(400, f'{where} must be a list', where)
    for j, call in enumerate(calls):
        fn = call.get('function') if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get('name'), str):
            raise ApiError(400, f'{where}[{j}] must have a function with a name',
                           f'{where}[{j}]')
        if not isinstance(fn.get('arguments', '{}'), (str, dict)):
            raise ApiError(400, f'{where}[{j}].function.arguments must be a JSON string',
                           f'{where}[{j}]')


def _tools_for(body: T.ChatRequest) -> tuple[list[dict] | None, Constraint | None]:
    """The tools the prompt offers, and the tool-call constraint a forced tool_choice asks
    for ("required": one or more calls of any tool; a named function: exactly one call of
    it), whose argument values follow each tool's parameter schema."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
    if tools and len(tools) > MAX_TOOLS:
        raise ApiError(400, f'at most {MAX_TOOLS} tools, got {len(tools)}', 'tools')
    if tools and len(json.dumps(tools, ensure_ascii=False)) > MAX_TOOLS_CHARS:
        raise ApiError(400, f'the tools take more than {MAX_TOOLS_CHARS} characters as JSON',
                       'tools')
    choice = body.tool_choice
    if choice == 'none':
        return None, None
    name = None
    if isinstance(choice, dict):
        fn = choice.get('function')
        if choice.get('type', 'function') != 'function' or not isinstance(fn, dict) \
                or not isinstance(fn.get('name'), str):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or '
                           '{"type": "function", "function": {"name": ...}}', 'tool_choice')
        if not any((t.get('function') or {}).get('name') == fn['name'] for t in tools or []):
            raise ApiError(400, f'tool_choice names function {fn["name"]!r}, which is not in '
                           'tools', 'tool_choice')
        name = fn['name']
    elif choice == 'required' and not tools:
        raise ApiError(400, 'tool_choice is required but no tools were given', 'tool_choice')
    elif choice != 'required':  # "auto" or unset: the model decides
        return tools, None
    try:
        spec = ConstraintSpec.tool_call(tools, name)
    except UnsupportedConstraint as e:  # a tool the grammar cannot name (e.g. a space in it)
        param = e.feature if e.feature.startswith('tools') else 'tool_choice'
        raise ApiError(400, f'{param}: {e}', param) from None
    return tools, Constraint('tool_choice', spec)


def _template_kwargs(body: T.ChatRequest) -> dict:
    kwargs = dict(body.chat_template_kwargs or {})
    for name in RESERVED_TEMPLATE_ARGS:
        if name in kwargs:
            raise ApiError(400, f'chat_template_kwargs.{name} is set by the server and cannot '
                           'be passed', f'chat_template_kwargs.{name}')
    if body.reasoning is not None:
        kwargs['enable_thinking'] = body.reasoning.enabled
    effort = body.reasoning_effort
    if effort is not None:
        if effort not in ('none', 'high'):
            raise ApiError(400, f'reasoning_effort {effort!r}: GLM-4.6 has no reasoning levels; '
                           '"none" turns thinking off, "high" leaves it on, and '
                           'reasoning.max_tokens caps it', 'reasoning_effort',
                           'unsupported_field')
        thinking = effort == 'high'
        if kwargs.get('enable_thinking', thinking) != thinking:
            raise ApiError(400, f'reasoning_effort {effort!r} contradicts the thinking switch '
                           'of reasoning.enabled or chat_template_kwargs.enable_thinking',
                           'reasoning_effort')
        kwargs['enable_thinking'] = thinking
    return kwargs


def _logprob_count(body: T.ChatRequest) -> tuple[int | None, str | None]:
    """(alternatives per token, response style) from OpenAI's bool or Together's int."""
    if body.logprobs is True:
        return body.top_logprobs or 0, 'openai'
    if isinstance(body.logprobs, int) and not isinstance(body.logprobs, bool) \
            and body.logprobs > 0:
        return body.logprobs, 'together'
    return None, None


def _render_and_encode(backend: Backend, messages, tools, kwargs) -> tuple[str, list[int]]:
    try:
        text = backend.chat_template.render(messages, tools=tools, **kwargs)
    except ChatError as e:
        raise ApiError(400, str(e), 'messages') from None
    return text, backend.encode(text)


async def chat(backend: Backend, metrics: Metrics, body: T.ChatRequest):
    no_surrogates(body.model_dump(exclude_unset=True, by_alias=True), '')
    moderator = Moderator.of(backend, body.safety_model)
    messages = _check_messages(body.messages)
    tools, tool_call = _tools_for(body)
    constraint = output_constraint(body, tool_call)
    kwargs = _template_kwargs(body)
    # Rendering and tokenizing a long prompt takes a while: not on the event loop.
    text, prompt = await asyncio.to_thread(_render_and_encode, backend, messages, tools,
                                           kwargs)
    n_logprobs, style = _logprob_count(body)
    # Thinking on or off is what the template made of the prompt (enable_thinking): with it
    # on the model reasons first, and a constraint or budget applies after its </think>.
    budget = None if body.reasoning is None else body.reasoning.max_tokens
    # Off the event loop: a constraint is compiled here.
    requests = await asyncio.to_thread(
        gen_requests, backend, body, prompt, body.max_completion_tokens or body.max_tokens,
        n_logprobs, 'messages', constraint, contract.starts_in_reasoning(text), budget)
    rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())
    if moderator is not None:
        said = conversation('', [(m['role'], _text_of(m)) for m in messages])
        await moderator.check_prompt(said)
    handles = backend.generate_all(requests)
    streams = [metrics.track(h, len(prompt)) for h in handles]
    if moderator is not None:
        streams = [moderator.guard(s, said, whole=not body.stream) for s in streams]
    # A constraint or budget after the reasoning: the engine makes the answer start at
    # `</think>`, so all before it is reasoning, whether the model wrote `<think>` or not.
    r = requests[0]
    reasoning = r.reasoning and (r.constraint is not None or r.reasoning_budget is not None)
    if body.stream:
        return sse(_chat_chunks(backend, body, streams, tools, rid, created, len(prompt),
                                reasoning), handles)
    try:
        choices = await asyncio.gather(*[_chat_choice(backend, i, s, tools, style, reasoning)
                                         for i, s in enumerate(streams)])
    finally:  # an error in one choice, or the client gone: the others end too
        await close_all(handles)
    completion = sum(c.pop('_tokens') for c in choices)
    # The prompt counts once; its cached share is what every choice found cached.
    cached = min(c.pop('_cached') for c in choices)
    return {'id': rid, 'object': 'chat.completion', 'created': created,
            'model': backend.model_name, 'choices': choices, 'prompt': [],
            'usage': usage(len(prompt), completion, cached)}


def _text_of(message: dict) -> str:
    content = message.get('content')
    if isinstance(content, list):
        return ''.join(part['text'] for part in content)
    return content or ''


async def _chat_choice(backend, index, stream, tools, style, reasoning) -> dict:
    parser = GlmOutputParser(tools, in_reasoning=reasoning)
    n, finish, logprobs = 0, None, []
    cached = 0
    async for event in stream:
        cached = event.cached_tokens or cached
        parser.feed(event.text)
        n += len(event.token_ids)
        logprobs += event.logprobs or []
        finish = event.finish_reason or finish
    parser.finish()
    parsed = parser.result()
    message = {'role': 'assistant', 'content': parsed.content or None,
               'reasoning': parsed.reasoning or None,
               'reasoning_content': parsed.reasoning or None}
    if parsed.tool_calls:
        message['tool_calls'] = [
            {'id': c.id, 'type': 'function', 'index': i,
             'function': {'name': c.name, 'arguments': c.arguments}}
            for i, c in enumerate(parsed.tool_calls)]
        if finish == 'stop':
            finish = 'tool_calls'
    choice = {'index': index, 'message': message, 'finish_reason': finish, '_tokens': n,
              '_cached': cached}
    if style:
        choice['logprobs'] = _format_logprobs(backend, logprobs, style)
    return choice


def _format_logprobs(backend, logprobs: list[TokenLogprob], style: str) -> dict:
    def entry(token_id, lp):
        text = backend.decode([token_id])
        return {'token': text, 'logprob': lp, 'bytes': list(text.encode())}
    if style == 'together':
        return {'token_ids': [t.token_id for t in logprobs],
                'tokens': [backend.decode([t.token_id]) for t in logprobs],
                'token_logprobs': [t.logprob for t in logprobs]}
    return {'content': [{**entry(t.token_id, t.logprob),
                         'top_logprobs': [entry(i, lp) for i, lp in t.top]}
                        for t in logprobs]}


async def _chat_chunks(backend, body, streams, tools, rid, created, n_prompt, reasoning):
    def chunk(index, delta=None, finish=None, usage=None, logprobs=None):
        choices = [] if index is None else [{
            'index': index, 'delta': {'role': 'assistant', **(delta or {})},
            'finish_reason': finish, **({'logprobs': logprobs} if logprobs else {})}]
        out = {'id': rid, 'object': 'chat.completion.chunk', 'created': created,
               'model': backend.model_name, 'choices': choices}
        if usage:
            out['usage'] = usage
        return out

    total, cached = 0, None
    for index, stream in enumerate(streams):
        parser = GlmOutputParser(tools, in_reasoning=reasoning)
        yield chunk(index, {'content': ''})
        finish, any_call = None, False
        async for event in stream:
            total += len(event.token_ids)
            if event.cached_tokens is not None:  # the prompt counts once: the least cached
                cached = event.cached_tokens if cached is None else min(cached,
                                                                       event.cached_tokens)
            finish = event.finish_reason or finish
            delta = parser.feed(event.text)
            if event.finish_reason:
                last = parser.finish()
                delta.reasoning += last.reasoning
                delta.content += last.content
                delta.tool_calls += last.tool_calls
            any_call |= bool(delta.tool_calls)
            payload = _chat_delta(delta)
            lp = (_format_logprobs(backend, event.logprobs, 'openai')
                  if event.logprobs else None)
            if payload or lp:
                yield chunk(index, payload, logprobs=lp)
        if any_call and finish == 'stop':
            finish = 'tool_calls'
        yield chunk(index, {}, finish)
    if body.stream_options and body.stream_options.include_usage:
        yield chunk(None, usage=usage(n_prompt, total, cached or 0))


def _chat_delta(delta) -> dict:
    out = {}
    if delta.reasoning:
        out['reasoning'] = out['reasoning_content'] = delta.reasoning
    if delta.content:
        out['content'] = delta.content
    if delta.tool_calls:
        calls = []
        for c in delta.tool_calls:
            call = {'index': c.index, 'function': {'arguments': c.arguments}}
            if c.id is not None:
                call.update(id=c.id, type='function')
                call['function']['name'] = c.name
            calls.append(call)
        out['tool_calls'] = calls
    return out
