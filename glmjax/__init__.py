"""glmjax: the GLM-4.x MoE transformer (Glm4MoeForCausalLM) in JAX/Flax."""

from glmjax.cache import KVCache, cache_shapes, init_cache
from glmjax.checkpoint import load_checkpoint
from glmjax.config import ConfigError, GlmConfig
from glmjax.generate import generate
from glmjax.hf import CheckpointError, load_hf
from glmjax.inference import decode, forward, hidden_states, mtp_forward, prefill
from glmjax.model import abstract_params, init_params, param_axes
from glmjax.sampling import SamplingParams, sample

__all__ = [
    'CheckpointError', 'ConfigError', 'GlmConfig', 'KVCache', 'SamplingParams',
    'abstract_params', 'cache_shapes', 'decode', 'forward', 'generate', 'hidden_states',
    'init_cache', 'init_params', 'load_checkpoint', 'load_hf', 'mtp_forward', 'param_axes',
    'prefill', 'sample',
]
