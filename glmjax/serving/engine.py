"""The engine interface the orchestrator drives, and what its implementation
(glmjax/serving/paged_engine.py) shares with it: per-request settings, step outputs, the
sampler's bookkeeping, and where arrays live on the mesh.

The orchestrator `prefill`s a request (a sequence begins: its cached prefix is found),
`insert`s it into a slot (its decode row is set; its prompt is computed by the following
calls), calls `generate` for the running slots' next tokens, one jitted call at a time, and
`free`s a slot when its request ends. Every call returns at once (JAX dispatches
asynchronously) and outputs stay device arrays until the orchestrator fetches them.

A slot is done (device side) once it samples one of its stop ids or reaches its token
budget; a done slot neither advances nor emits until the host frees it.
"""

import abc
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax.sampling import SamplingParams, sample
from glmjax.sharding.rules import Rules

MAX_STOP_IDS = 16  # stop token ids per request, the model's eos ids included


class EngineLost(Exception):
    """The engine cannot go on: a process that shares the mesh is gone. Requests in flight
    cannot finish; the server stops serving."""


@dataclasses.dataclass(frozen=True)
class SlotSettings:
    """What a request sets for its slot (host values)."""
    max_new: int  # tokens to generate at most (max_tokens, or what the context leaves)
    stop_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> 'SlotSettings':
        return cls(**{**raw, 'stop_ids': tuple(raw['stop_ids']),
                      'logit_bias': tuple((int(t), float(b)) for t, b in raw['logit_bias'])})

    def sampling(self) -> SamplingParams:
        return SamplingParams.make(
            1, self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
            self.presence_penalty, self.frequency_penalty, self.seed, dict(self.logit_bias))


@struct.dataclass
class StepOutput:
    """Tokens sampled by one call: [B, steps] (insert: [1, 1]); valid marks real tokens."""
    tokens: jax.Array  # i32
    valid: jax.Array  # bool
    logprobs: jax.Array  # f32
    top_ids: jax.Array  # [..., TOP_LOGPROBS] i32
    top_logprobs: jax.Array  # [..., TOP_LOGPROBS] f32
    done: jax.Array  # [B] (insert: [1]) bool: the slot is done after this call


@dataclasses.dataclass(frozen=True)
class Prefix:
    """A begun sequence (what `prefill` returns and `insert` takes): its prompt, and how many
    of the prompt's tokens the prefix cache already holds (they are not computed again)."""
    seq_id: int
    prompt: tuple[int, ...]
    cached_tokens: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt)


class Engine(abc.ABC):
    """What the orchestrator needs from a model. Only one thread calls these."""
    max_batch: int
    max_seq_len: int
    vocab_size: int
    steps_per_call: int

    @abc.abstractmethod
    def prefill(self, tokens: list[int]) -> Prefix: ...

    @abc.abstractmethod
    def insert(self, prefix: Prefix, slot: int, settings: SlotSettings) -> StepOutput:
        """Binds a begun sequence to a free slot. Returns an output [1, 1] with no valid
        token: the prompt is computed by the next `generate` calls, and the first token
        comes with their outputs."""

    @abc.abstractmethod
    def generate(self, masks: Callable[[], np.ndarray] | None = None) -> StepOutput:
        """One device call: up to steps_per_call tokens for every running slot, [max_batch,
        steps_per_call]. With `masks` the call is one step, and masks() is called at most
        once, after its forward is dispatched and before its sampling, for [max_batch,
        ceil(V / 32)] int32 token bitmasks (glmjax.token_mask) of each slot's next token:
        the caller fetches the previous call's tokens and fills the masks from them while
        the device runs the forward. (Not called when the call fails first, or, in
        PagedEngine, called with no forward when no slot is running.)"""

    @abc.abstractmethod
    def free(self, slot: int) -> None: ...

    @abc.abstractmethod
    def embed_begin(self, prompts: list[list[int]]) -> int:
        """Queues an embedding call, computed by the next `generate` calls beside the running
        sequences (which call it even with no slot running while `embedding_work`); returns
        its id, for `embed_results` and `embed_cancel`."""

    @abc.abstractmethod
    def embed_cancel(self, key: int) -> None:
        """Drops an embedding call that is not handed over yet: nothing more of it runs."""

    @abc.abstractmethod
    def embed_results(self, block: bool = False) -> list[tuple[int, np.ndarray]]:
        """The calls done since the last time, as (id, [n, D] fp32: each input's final hidden
        states, mean-pooled and L2-normalised); without `block`, only those whose device steps
        are finished (no wait). A host read: no device call to make in lockstep."""

    @property
    @abc.abstractmethod
    def embedding_work(self) -> bool:
        """Whether some embedding input still has tokens to compute."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Empties every slot (after an error left the decode state unusable)."""

    @abc.abstractmethod
    def warmup(self, progress=None) -> None:
        """Compiles every shape that serving will use; `progress(done, total)` after each."""

    @abc.abstractmethod
    def metrics(self) -> dict:
        """Host counters for /metrics (serving/metrics.py): `kv_cache_usage` and the rest
        named as vLLM's. No device call."""

    def lost(self) -> str | None:
        """Asked after a device call failed: why the engine can never go on (a process of
        the mesh is gone), or None when it can."""
        return None

    @property
    def capacity(self) -> int:
        """The most tokens (prompt + output) one sequence can ever hold."""
        return self.max_seq_len

    def can_admit(self, prompt: list[int], max_new: int) -> bool:
        """Whether a free slot can take this request now; when not, it waits in the queue."""
        return True

    def cached_tokens(self, slot: int) -> int:
        """The slot's prompt tokens served from the prefix cache so far (at least its
        Prefix's: more when the engine later takes pages another prompt computed)."""
        return 0


def choose(logits, sampling, counts, prompt_mask, generated, max_new, stop_ids, active,
           allowed=None):
    """Samples one token per row (under the bitmask `allowed`, if given) and advances the
    rows that are active."""
    tokens, logprobs, top_ids, top_lps = sample(logits, sampling, counts, prompt_mask,
                                                generated, allowed)
    rows = jnp.arange(tokens.shape[0])
    counts = counts.at[rows, tokens].add(active.astype(jnp.int32))
    generated = generated + active
    stopped = jnp.any(tokens[:, None] == stop_ids, axis=-1) | (generated >= max_new)
    out = StepOutput(tokens=tokens, valid=active, logprobs=logprobs, top_ids=top_ids,
                     top_logprobs=top_lps, done=active & stopped)
    return out, counts, generated


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the engine's arrays live: a mesh, and the rules that place the KV pages on it.
    Hashable, so jitted functions take it as a static argument."""
    mesh: Mesh
    rules: Rules

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def put(self, tree):
        """Host values onto every device of the mesh (the same values in every process)."""
        return jax.device_put(tree, jax.tree.map(lambda _: self.replicated, tree))


def local(out: StepOutput) -> StepOutput:
    """Replicated outputs: this process's first copy can be fetched even when the mesh
    spans other processes. Still asynchronous."""
    return jax.tree.map(lambda x: x.addressable_data(0), out)
