"""The one request contract of both APIs: what a generation request may ask, checked once.

gRPC (service.py) and HTTP (openai_api.py) each turn their wire message into a `GenRequest`
and call `check`, which range-checks every value that will reach the device, with the same
limits and the same messages (only the field path differs: gRPC nests sampling fields under
`sampling.`). What passes `check` cannot fail on the engine thread: `slot_settings` turns it
into the engine's per-slot settings.

An output constraint (structured output, a forced tool call) is compiled here too, through the
server's ConstraintCompiler, so that a schema feature it cannot enforce is refused before the
request is queued (compiled grammars are cached: the engine's matcher costs nothing more).
"""

import dataclasses
import math
import random
import threading
import weakref
from collections.abc import Sequence

from glmjax.sampling import MAX_LOGIT_BIAS, TOP_LOGPROBS
from glmjax.serving.constraints import (
    ConstraintCompiler,
    ConstraintSpec,
    Matcher,
    UnsupportedConstraint,
)
from glmjax.serving.engine import MAX_STOP_IDS, SlotSettings
from glmjax.serving.glm_parser import END_THINK, THINK
from glmjax.serving.tokenizer import Tokenizer

MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS = 16, 256
MAX_N = 16  # choices per HTTP request, admitted all at once or not at all
MAX_TEMPERATURE = 100.0
MAX_PENALTY = 100.0  # repetition_penalty
MAX_BIAS = 100.0  # |logit_bias| values, as OpenAI documents
SEED_RANGE = 2 ** 64  # seeds in [-2**63, 2**64) are taken modulo 2**32
MAX_REASONING_BUDGET = 2 ** 31 - 1
ASSISTANT = '<|assistant|>'  # GLM's generation prompt


class InvalidRequest(ValueError):
    """`code`: the HTTP error code (None for a plain invalid value); 'unsupported_field' for
    what this server cannot do, 'unsupported_constraint' for a constraint it cannot enforce."""

    def __init__(self, field: str, message: str, code: str | None = None):
        super().__init__(f'{field}: {message}')
        self.field, self.message, self.code = field, message, code


@dataclasses.dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_seq_len: int
    eos_ids: tuple[int, ...]


@dataclasses.dataclass
class GenRequest:
    """One sequence to generate, as either API asks for it (host values, not yet checked)."""
    prompt_ids: list[int]
    max_tokens: int | None = None  # None: what the context leaves
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token; None: no logprobs
    ignore_eos: bool = False
    # What the answer must be (a JSON schema, a regex, a tool call...); None: free text.
    constraint: ConstraintSpec | None = None
    # The prompt leaves the model about to reason (GLM thinking on, see starts_in_reasoning):
    # the reasoning is free and the constraint applies after `</think>`; False: from the
    # first generated token.
    reasoning: bool = False
    # At most this many reasoning tokens, then `</think>` is forced; None: no cap. Without
    # `reasoning` there is no reasoning to cap: the budget is met, and the engine ignores it.
    reasoning_budget: int | None = None


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(field, message)


def _number(value, field: str, low: float, high: float, low_open: bool = False) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), field,
           f'must be a number, got {value!r}')
    inside = low < value <= high if low_open else low <= value <= high
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}]'
    _check(math.isfinite(value) and inside, field, f'must be in {interval}, got {value}')


def _integer(value, field: str, low: int, high: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool), field,
           f'must be an integer, got {value!r}')
    _check(low <= value <= high, field, f'must be in [{low}, {high}], got {value}')


def check_prompt(ids: list[int], limits: Limits, tokens_field: str = 'prompt') -> None:
    _check(len(ids) > 0, 'prompt', 'is empty')
    for i, t in enumerate(ids):
        _check(isinstance(t, int) and 0 <= t < limits.vocab_size, f'{tokens_field}[{i}]',
               f'token id {t} is outside the vocabulary [0, {limits.vocab_size})')
    _check(len(ids) < limits.max_seq_len, 'prompt',
           f'{len(ids)} tokens leave no room to generate within the context limit of '
           f'{limits.max_seq_len} tokens (--max_seq_len, or what the KV cache holds)')


def starts_in_reasoning(prompt_text: str) -> bool:
    """Whether a GLM model continuing this prompt reasons first: the prompt ends with the
    assistant turn just opened (thinking on: the model writes `<think>` itself) or inside an
    unclosed `<think>`. With thinking off GLM's templates close the block in the prompt
    (`<think></think>`), and a prompt that is no chat turn has neither: the constraint then
    applies from the first token. Both APIs decide it from the prompt, the same way."""
    _, assistant, turn = prompt_text.rpartition(ASSISTANT)
    if assistant and not turn.strip():
        return True
    tail = turn if assistant else prompt_text
    return tail.rfind(THINK) > tail.rfind(END_THINK)


def check(r: GenRequest, limits: Limits, sampling_prefix: str = '',
          tokens_field: str = 'prompt', constraint_field: str = 'constraint',
          budget_field: str = 'reasoning_budget',
          compiler: ConstraintCompiler | None = None) -> None:
    """Raises InvalidRequest naming the first field at fault. A constraint is compiled with
    `compiler` (None: this server cannot compile one, and the request is refused)."""
    check_prompt(r.prompt_ids, limits, tokens_field)
    room = limits.max_seq_len - len(r.prompt_ids)
    if r.max_tokens is not None:
        _integer(r.max_tokens, 'max_tokens', 1, 2 ** 31 - 1)
        _check(r.max_tokens <= room, 'max_tokens',
               f'prompt of {len(r.prompt_ids)} tokens + max_tokens {r.max_tokens} exceeds the '
               f'context limit of {limits.max_seq_len} tokens (--max_seq_len, or what the KV '
               'cache holds)')
    s = sampling_prefix
    _number(r.temperature, f'{s}temperature', 0.0, MAX_TEMPERATURE)
    _number(r.top_p, f'{s}top_p', 0.0, 1.0, low_open=True)
    _integer(r.top_k, f'{s}top_k', -1, 2 ** 31 - 1)
    _number(r.min_p, f'{s}min_p', 0.0, 1.0)
    _number(r.repetition_penalty, f'{s}repetition_penalty', 0.0, MAX_PENALTY, low_open=True)
    _number(r.presence_penalty, f'{s}presence_penalty', -2.0, 2.0)
    _number(r.frequency_penalty, f'{s}frequency_penalty', -2.0, 2.0)
    _check(len(r.logit_bias) <= MAX_LOGIT_BIAS, f'{s}logit_bias',
           f'at most {MAX_LOGIT_BIAS} entries, got {len(r.logit_bias)}')
    for token, bias in r.logit_bias.items():
        _check(isinstance(token, int) and 0 <= token < limits.vocab_size, f'{s}logit_bias',
               f'token id {token} is outside the vocabulary [0, {limits.vocab_size})')
        _number(bias, f'{s}logit_bias[{token}]', -MAX_BIAS, MAX_BIAS)
    if r.seed is not None:
        _integer(r.seed, f'{s}seed', -SEED_RANGE // 2, SEED_RANGE - 1)
    _check(len(r.stop) <= MAX_STOP_STRINGS, 'stop',
           f'at most {MAX_STOP_STRINGS} stop strings, got {len(r.stop)}')
    for i, text in enumerate(r.stop):
        _check(isinstance(text, str) and 0 < len(text) <= MAX_STOP_STRING_CHARS, f'stop[{i}]',
               f'must have 1 to {MAX_STOP_STRING_CHARS} characters, got {len(text)}')
    for i, t in enumerate(r.stop_token_ids):
        _check(isinstance(t, int) and 0 <= t < limits.vocab_size, f'stop_token_ids[{i}]',
               f'{t} is outside the vocabulary [0, {limits.vocab_size})')
    _check(len(stop_ids(r, limits)) <= MAX_STOP_IDS, 'stop_token_ids',
           f'at most {MAX_STOP_IDS} stop ids with the model eos ids, got '
           f'{len(stop_ids(r, limits))}')
    if r.logprobs is not None:
        _integer(r.logprobs, 'top_logprobs', 0, TOP_LOGPROBS)
    if r.reasoning_budget is not None:
        _integer(r.reasoning_budget, budget_field, 0, MAX_REASONING_BUDGET)
    if r.constraint is not None:
        # A complete constrained output allows only the eos ids next: ignoring them would
        # leave the sequence nothing to generate.
        _check(not r.ignore_eos, 'ignore_eos', f'cannot be combined with {constraint_field}: '
               'a constrained output ends at an eos id once complete')
        check_constraint(r.constraint, compiler, constraint_field)


def check_constraint(spec: ConstraintSpec, compiler: ConstraintCompiler | None,
                     field: str) -> None:
    """Compiles `spec` (cached by the compiler); what it cannot enforce is refused, naming
    the feature, never relaxed."""
    if compiler is None:
        raise InvalidRequest(field, 'structured output is not available on this server: it '
                             'has no grammar compiler for its tokenizer (one needs a '
                             'tokenizer.json)', 'unsupported_field')
    try:
        compiler.compile(spec)
    except UnsupportedConstraint as e:
        what = str(e) if e.feature == spec.kind else f'cannot enforce {e.feature!r}: {e}'
        raise InvalidRequest(field, what, 'unsupported_constraint') from None


# One compiler per tokenizer, shared by both APIs (the gRPC service and the HTTP backend hold
# the same Tokenizer), so that they share its cache of compiled grammars too. Built on first
# use: it reads the whole vocabulary, which a server that never sees a constraint skips.
_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def constraint_compiler(tokenizer: Tokenizer, vocab_size: int,
                        eos_ids: Sequence[int]) -> ConstraintCompiler | None:
    """The compiler for this tokenizer and model vocabulary, the eos ids ending a complete
    output; None when the tokenizer cannot have one (a sentencepiece model)."""
    key = (vocab_size, tuple(eos_ids))
    with _compilers_lock:
        per_tokenizer = _compilers.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            try:
                per_tokenizer[key] = ConstraintCompiler(tokenizer, vocab_size, key[1])
            except ValueError:  # UnsupportedConstraint: not a tokenizer.json tokenizer
                per_tokenizer[key] = None
        return per_tokenizer[key]


def matcher(r: GenRequest, tokenizer: Tokenizer, limits: Limits) -> Matcher | None:
    """The constrained-decoding matcher of a request that passed `check` (None: free
    output): its constraint, after the reasoning when the model reasons first, and its
    reasoning budget."""
    budget = r.reasoning_budget if r.reasoning else None  # no reasoning: nothing to cap
    if r.constraint is None and budget is None:
        return None
    compiler = constraint_compiler(tokenizer, limits.vocab_size, limits.eos_ids)
    return compiler.matcher(r.constraint, r.reasoning, budget)


def stop_ids(r: GenRequest, limits: Limits) -> tuple[int, ...]:
    return tuple(dict.fromkeys((() if r.ignore_eos else limits.eos_ids)
                               + tuple(r.stop_token_ids)))


def slot_settings(r: GenRequest, limits: Limits) -> SlotSettings:
    """The engine's settings for a request that passed `check`."""
    seed = random.getrandbits(32) if r.seed is None else r.seed % 2 ** 32
    return SlotSettings(
        max_new=r.max_tokens or limits.max_seq_len - len(r.prompt_ids),
        stop_ids=stop_ids(r, limits), temperature=float(r.temperature),
        top_k=max(0, r.top_k), top_p=float(r.top_p), min_p=float(r.min_p),
        repetition_penalty=float(r.repetition_penalty),
        presence_penalty=float(r.presence_penalty),
        frequency_penalty=float(r.frequency_penalty), seed=seed,
        logit_bias=tuple(sorted((t, float(b)) for t, b in r.logit_bias.items())))
