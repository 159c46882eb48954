"""A tiny GLM-4.6-shaped model with random weights and a small byte-level BPE tokenizer that
carries GLM's special tokens by name: for tests and benchmarks that want random weights
(glmjax-serve's embedded default is the trained demo model in glmjax/demo_model/).

The tokenizer is trained with `tokenizers` on the text below, once, and cached on disk
(~/.cache/glmjax, or $GLMJAX_CACHE). Its ids differ from GLM-4.6's (the vocabulary is about
1K, not 151K); the model's vocab_size and eos ids are set from it.
"""

import dataclasses
import hashlib
import os
import tempfile

import jax.numpy as jnp

from glmjax.config import GlmConfig
from glmjax.corpus import EOS_TOKENS, SPECIAL_TOKENS, TAG_TOKENS  # noqa: F401
from glmjax.demo import tiny_glm46
from glmjax.model import init_params
from glmjax.serving.tokenizer import Tokenizer

BPE_VOCAB = 1024  # merges + the 256 byte tokens + the special tokens
WEIGHTS_SEED = 0
VOCAB_MULTIPLE = 128

TRAINING_TEXT = """\
GLM is a family of large language models. GLM-4.6 is a mixture-of-experts transformer with
160 routed experts, one shared expert and eight experts chosen for every token.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. To be or not to be, that is the question.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
import jax.numpy as jnp
x = jnp.einsum('BTD,DNH->BTNH', x, w)  # attention projections
{"name": "get_weather", "arguments": {"city": "Beijing", "unit": "celsius"}}
The user asks a question; the assistant thinks, then answers, and may call a tool.
Serving streams tokens back as soon as they are generated, one step at a time.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 42.
Unicode: café, naïve, résumé, Zürich, São Paulo, 北京, 你好世界, 東京, こんにちは, Привет,
مرحبا, שלום, 🙂 🚀 ✓ — “quotes” and ‘more’ … ellipsis.
"""


def cache_dir() -> str:
    return os.environ.get('GLMJAX_CACHE', os.path.expanduser('~/.cache/glmjax'))


def _train() -> 'tokenizers.Tokenizer':  # noqa: F821
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, show_progress=False, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True) * 4, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


def tokenizer_path() -> str:
    """Builds the default tokenizer once; later calls return the cached file."""
    key = hashlib.sha256(repr((TRAINING_TEXT, SPECIAL_TOKENS, TAG_TOKENS, BPE_VOCAB))
                         .encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f'default-tokenizer-{key}.json')
    if not os.path.exists(path):
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.NamedTemporaryFile('w', dir=cache_dir(), suffix='.tmp',
                                         delete=False) as f:
            f.write(_train().to_str())
        os.replace(f.name, path)  # atomic: a concurrent builder never sees half a file
    return path


def default_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path())


def default_config(tokenizer: Tokenizer) -> GlmConfig:
    """tiny_glm46() with the vocabulary and eos ids of the default tokenizer. The vocabulary
    is padded to a multiple of VOCAB_MULTIPLE, as GLM's is (151552 = 1184 * 128), so that it
    splits over tensor-parallel shards."""
    eos = tuple(tokenizer.token_id(t) for t in EOS_TOKENS)
    vocab = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return dataclasses.replace(tiny_glm46(), vocab_size=vocab,
                               eos_token_ids=eos, pad_token_id=eos[0])


def default_model(dtype=jnp.float32) -> tuple[GlmConfig, dict, Tokenizer]:
    tokenizer = default_tokenizer()
    cfg = default_config(tokenizer)
    return cfg, init_params(cfg, dtype, seed=WEIGHTS_SEED), tokenizer
