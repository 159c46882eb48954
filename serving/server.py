"""glmjax-serve: the gRPC server and the OpenAI/Together-compatible HTTP API, one engine.

    glmjax-serve                          # the embedded default: tiny random GLM-4.6-shaped
    glmjax-serve --checkpoint DIR         # a glmjax-convert output (Orbax + tokenizer.json)
    glmjax-serve --hf_dir DIR             # a Hugging Face checkpoint directory

Listens at once (health NOT_SERVING), loads and compiles, then serves (health SERVING;
HTTP /health answers 503 until then).
Compiled programs persist in ~/.cache/glmjax/xla (GLMJAX_COMPILATION_CACHE=off: no).
SIGTERM or SIGINT: stop admitting (UNAVAILABLE), let in-flight requests finish within
--drain_grace_s, cancel the rest, exit 0.
"""

import os
import signal
import sys
import threading

import jax.numpy as jnp
from absl import app, flags, logging

from glmjax import compile_cache
from glmjax.config import GlmConfig
from serving.chat import DEFAULT_TEMPLATE, ChatTemplate
from serving.engine import GlmEngine
from serving.service import GlmServer
from serving.tokenizer import Tokenizer

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'a glmjax-convert checkpoint directory')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'a Hugging Face checkpoint directory')
_DTYPE = flags.DEFINE_enum('dtype', None, ['bfloat16', 'float32'],
                           'weights dtype (default: bfloat16 for checkpoints, float32 for the '
                           'embedded default)')
_HOST = flags.DEFINE_string('grpc_host', '0.0.0.0', 'address to listen on')
_PORT = flags.DEFINE_integer('grpc_port', 50051, 'port to listen on; 0 picks a free one')
_HTTP_HOST = flags.DEFINE_string('http_host', '0.0.0.0', 'address of the HTTP API')
_HTTP_PORT = flags.DEFINE_integer('http_port', 8000, 'port of the HTTP API; 0 picks a free '
                                  'one, -1 serves gRPC only')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 8, 'decode slots (concurrent sequences)')
_MAX_SEQ_LEN = flags.DEFINE_integer('max_seq_len', 512, 'prompt + output tokens per request')
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 64, 'requests waiting for a slot; beyond it '
                                  'Generate answers RESOURCE_EXHAUSTED')
_STEPS = flags.DEFINE_integer('decode_steps', 4, 'decode steps per device call')
_API_KEY = flags.DEFINE_string('api_key', None, 'require "authorization: Bearer <key>" '
                               '(default: $GLMJAX_API_KEY, else no auth)')
_TLS_CERT = flags.DEFINE_string('tls_cert', None, 'PEM certificate chain (with --tls_key)')
_TLS_KEY = flags.DEFINE_string('tls_key', None, 'PEM private key (with --tls_cert)')
_GRACE = flags.DEFINE_float('drain_grace_s', 30.0, 'on SIGTERM, seconds in-flight requests '
                            'get to finish')


def load_model(checkpoint: str | None = None, hf_dir: str | None = None,
               dtype: str | None = None):
    """(cfg, params, tokenizer, model name): a converted checkpoint, a Hugging Face directory,
    or with neither the embedded default."""
    if checkpoint and hf_dir:
        raise app.UsageError('give --checkpoint or --hf_dir, not both')
    dtype = jnp.dtype(dtype) if dtype else None
    if checkpoint:
        try:
            from glmjax.checkpoint import load_checkpoint
        except ImportError:
            raise app.UsageError('--checkpoint is not available: this build of glmjax has no '
                                 'load_checkpoint (glmjax/checkpoint.py); use --hf_dir') from None
        cfg, params = load_checkpoint(checkpoint, dtype=dtype or jnp.bfloat16)
        return cfg, params, Tokenizer.from_dir(checkpoint), _name(checkpoint)
    if hf_dir:
        from glmjax.hf import load_hf
        cfg = GlmConfig.from_hf(hf_dir)
        params = load_hf(hf_dir, cfg, dtype or jnp.bfloat16)
        return cfg, params, Tokenizer.from_dir(hf_dir), _name(hf_dir)
    from serving.default_model import default_model
    cfg, params, tokenizer = default_model(dtype or jnp.float32)
    return cfg, params, tokenizer, 'glmjax-default-tiny-glm46'


def chat_template(model_dir: str | None) -> ChatTemplate:
    """The checkpoint's own template; the GLM-4.6 format for the embedded default."""
    if model_dir:
        return ChatTemplate.from_dir(model_dir)
    with open(DEFAULT_TEMPLATE) as f:
        return ChatTemplate(f.read())


def start_http(server: GlmServer, params, api_key: str | None, model_dir: str | None,
               host: str, port: int):
    """The HTTP API over the gRPC server's orchestrator: one engine, one set of slots."""
    from serving.http_backend import EngineBackend
    from serving.http_server import HttpServer
    backend = EngineBackend(server.orchestrator, server.tokenizer, server.cfg, params,
                            server.model_name, server.engine.max_seq_len,
                            chat_template(model_dir),
                            ready=lambda: server.ready and not server.stopping)
    return HttpServer(backend, host, port, api_key).start()


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _tls() -> tuple[bytes, bytes] | None:
    if bool(_TLS_CERT.value) != bool(_TLS_KEY.value):
        raise app.UsageError('--tls_cert and --tls_key go together')
    if not _TLS_CERT.value:
        return None
    with open(_TLS_CERT.value, 'rb') as c, open(_TLS_KEY.value, 'rb') as k:
        return c.read(), k.read()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    compile_cache.enable()  # a restart loads the compiled buckets instead of compiling them
    cfg, params, tokenizer, name = load_model(_CHECKPOINT.value, _HF_DIR.value, _DTYPE.value)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise app.UsageError(f'the tokenizer has {tokenizer.vocab_size} tokens but the model '
                             f'only {cfg.vocab_size}')
    engine = GlmEngine(cfg, params, _MAX_BATCH.value, _MAX_SEQ_LEN.value, _STEPS.value)
    api_key = _API_KEY.value or os.environ.get('GLMJAX_API_KEY')
    server = GlmServer(engine, tokenizer, cfg, name, _MAX_QUEUE.value, _HOST.value,
                       _PORT.value, api_key, _tls()).start()
    print(f'glmjax-serve: listening on {_HOST.value}:{server.port} (warming up)', flush=True)
    http = None
    if _HTTP_PORT.value >= 0:
        http = start_http(server, params, api_key, _CHECKPOINT.value or _HF_DIR.value,
                          _HTTP_HOST.value, _HTTP_PORT.value)
        print(f'glmjax-serve: HTTP API on http://{_HTTP_HOST.value}:{http.port}/v1',
              flush=True)
    if not stop.is_set():
        server.warmup()
        print(f'glmjax-serve: serving {name} on port {server.port}', flush=True)
    while not stop.wait(0.5):  # a timeout keeps the main thread responsive to signals
        pass
    print('glmjax-serve: shutting down, draining in-flight requests', flush=True)
    drained = server.shutdown(_GRACE.value)
    if http is not None:
        http.stop()
    print(f'glmjax-serve: stopped ({"drained" if drained else "grace period over"})',
          flush=True)
    logging.flush()
    sys.exit(0)


def run():
    app.run(main)


if __name__ == '__main__':
    run()
