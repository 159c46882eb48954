"""glmjax-serve: the gRPC server and the OpenAI/Together-compatible HTTP API, one engine.

    glmjax-serve                          # the embedded default: tiny random GLM-4.6-shaped
    glmjax-serve --checkpoint DIR         # a glmjax-convert output (Orbax + tokenizer.json)
    glmjax-serve --hf_dir DIR             # a Hugging Face checkpoint directory

    glmjax-serve --mesh expert=4,tensor=2 # weights and KV cache sharded over the devices

Several processes (a TPU pod slice, GPU nodes, launch/local.sh): every process runs the same
command with --coordinator_address/--num_processes/--process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; or --distributed_auto on Cloud TPU and SLURM) and a
--mesh over all their devices. Process 0 serves
gRPC and HTTP and decides every step; the others follow it (serving/lockstep.py) over a
connection to --lockstep_port on process 0. When a process dies or hangs, process 0 turns
NOT_SERVING, answers requests in flight UNAVAILABLE and, like every process, exits with
code 3. Followers ignore SIGTERM: they stop when process 0 has drained and says so.

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
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from glmjax import compile_cache
from glmjax.config import GlmConfig
from glmjax.progress import Progress
from glmjax.serving import lockstep
from glmjax.serving.chat import ChatTemplate
from glmjax.serving.engine import EngineLost
from glmjax.serving.paged_engine import KV_MEMORY_FRACTION, PagedEngine
from glmjax.serving.service import GlmServer
from glmjax.serving.tokenizer import Tokenizer
from glmjax.sharding import distributed
from glmjax.sharding.mesh import MeshError, make_mesh, parse_mesh
from glmjax.sharding.rules import PRESETS, RulesError

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
_PAGE_SIZE = flags.DEFINE_integer('page_size', 16, 'tokens per KV page')
_KV_CACHE_GB = flags.DEFINE_float('kv_cache_gb', None, 'GiB of KV pages, whole tokens over all '
                                  'devices (glmjax-plan prints it for a mesh); default: on GPU '
                                  'and TPU 90% of each device\'s memory less the weights, on '
                                  'CPU max_batch sequences of max_seq_len')
_PREFIX_CACHING = flags.DEFINE_boolean('prefix_caching', True, 'share the KV pages of '
                                       'repeated prompt prefixes')
_SPECULATIVE = flags.DEFINE_enum('speculative', None, ['mtp'], 'mtp: decode speculatively, '
                                  'drafting with the checkpoint\'s MTP layer and verifying the '
                                  'drafts in one forward (greedy output unchanged, sampled '
                                  'output keeps its distribution)')
_SPEC_TOKENS = flags.DEFINE_integer('num_speculative_tokens', 1, '--speculative=mtp: drafts '
                                    'per sequence and step (more than 1 applies the MTP layer '
                                    'to its own output)', lower_bound=1)
_SPEC_MAX_BATCH = flags.DEFINE_integer('speculative_max_batch', None, '--speculative=mtp: decode '
                                       'calls of more running sequences than this are plain '
                                       '(default: measured at start-up, a call speculates '
                                       'while the drafts accepted pay for what a speculative '
                                       'call of its size costs)', lower_bound=1)
_MODERATION = flags.DEFINE_string('moderation_prompt', None, 'JSON file of the instructions and '
                                  'verdicts with which the model classifies requests that ask '
                                  'for safety_model (default: glmjax/serving/moderation.json)')
_API_KEY = flags.DEFINE_string('api_key', None, 'require "authorization: Bearer <key>" '
                               '(default: $GLMJAX_API_KEY, else no auth)')
_TLS_CERT = flags.DEFINE_string('tls_cert', None, 'PEM certificate chain (with --tls_key)')
_TLS_KEY = flags.DEFINE_string('tls_key', None, 'PEM private key (with --tls_cert); both '
                               'serve gRPC and HTTP over TLS')
_SERVED_NAMES = flags.DEFINE_multi_string('served_model_name', [], 'a name the HTTP API '
                                          'answers to in `model`, and both APIs in '
                                          '`safety_model` (repeat for several, e.g. '
                                          'zai-org/GLM-4.6); the model\'s own name always')
_GRACE = flags.DEFINE_float('drain_grace_s', 30.0, 'on SIGTERM, seconds in-flight requests '
                            'get to finish')
_MESH = flags.DEFINE_string('mesh', None, 'device mesh over all devices of all processes, '
                            'e.g. expert=4,tensor=2 (axes data, expert, tensor); default: one '
                            'device (required with several processes)')
_RULES = flags.DEFINE_enum('rules', 'decode_ep', list(PRESETS), 'how weights and the KV '
                           'cache are laid out over the mesh (sharding/rules.py)')
_BATCHED_TOKENS = flags.DEFINE_integer('max_num_batched_tokens', None, 'tokens per step, one '
                                       'per decoding sequence plus prompt chunks (a long '
                                       'prompt is computed across steps while the others '
                                       'decode); at least --max_batch. Default: measured at '
                                       'start-up, the largest power of two whose step costs '
                                       'no more than a decode call of --max_batch sequences')
_LOCKSTEP_PORT = flags.DEFINE_integer('lockstep_port', None, 'several processes: the port on '
                                      'process 0 that the others connect to (default: the '
                                      'coordinator port + 1)')
_PEER_TIMEOUT = flags.DEFINE_float('peer_timeout_s', 30.0, 'several processes: a process '
                                   'silent this long is taken as hung')
distributed.define_flags()
DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'demo_model')
DEMO_NAME = 'glmjax-demo-glm46'
FAILURE_LINGER_S = 5.0  # NOT_SERVING stays visible this long before a failed leader exits


def load_model(checkpoint: str | None = None, hf_dir: str | None = None,
               dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: str | None = None):
    """(cfg, params, tokenizer, model name): a converted checkpoint, a Hugging Face directory,
    or with neither the embedded default; sharded over `mesh` when given."""
    if checkpoint and hf_dir:
        raise app.UsageError('give --checkpoint or --hf_dir, not both')
    dtype = jnp.dtype(dtype) if dtype else None
    try:
        if checkpoint:
            from glmjax.checkpoint import load_checkpoint
            cfg, params = load_checkpoint(checkpoint, dtype=dtype or jnp.bfloat16, mesh=mesh,
                                          rules=rules if mesh is not None else None,
                                          progress=Progress('restoring weights', 1))
            return cfg, params, Tokenizer.from_dir(checkpoint), _name(checkpoint)
        if hf_dir:
            from glmjax.hf import load_hf
            cfg = GlmConfig.from_hf(hf_dir)
            params = load_hf(hf_dir, cfg, dtype or jnp.bfloat16, mesh=mesh,
                             rules=rules if mesh is not None else None)
            return cfg, params, Tokenizer.from_dir(hf_dir), _name(hf_dir)
    except RulesError as e:
        raise app.UsageError(f'--mesh/--rules: {e}') from None
    # The embedded default: the demo model trained by glmjax-train, shipped in the package.
    cfg, params, tokenizer, _ = load_model(hf_dir=DEMO_MODEL, dtype=str(dtype or 'float32'),
                                           mesh=mesh, rules=rules)
    return cfg, params, tokenizer, DEMO_NAME


def chat_template(model_dir: str | None) -> ChatTemplate:
    """The checkpoint's own template (the embedded default's: the GLM-4.6 format)."""
    return ChatTemplate.from_dir(model_dir or DEMO_MODEL)


def start_http(server: GlmServer, api_key: str | None, host: str, port: int,
               tls_files: tuple[str, str] | None = None):
    """The HTTP API over the gRPC server's orchestrator: one engine, one set of slots, the
    same served names, chat template and moderation file. `tls_files`: (certificate chain,
    private key) PEM paths, the same as gRPC's."""
    from glmjax.serving.http_backend import EngineBackend
    from glmjax.serving.http_server import HttpServer
    backend = EngineBackend(server.orchestrator, server.tokenizer, server.cfg,
                            server.model_name, server.engine.capacity, server.chat_template,
                            ready=lambda: server.ready and not server.stopping,
                            draining=lambda: server.stopping,
                            served_names=server.served_names)
    backend.moderation = server.moderation
    return HttpServer(backend, host, port, api_key, tls_files).start()


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _tls() -> tuple[bytes, bytes] | None:
    if bool(_TLS_CERT.value) != bool(_TLS_KEY.value):
        raise app.UsageError('--tls_cert and --tls_key go together')
    if not _TLS_CERT.value:
        return None
    with open(_TLS_CERT.value, 'rb') as c, open(_TLS_KEY.value, 'rb') as k:
        return c.read(), k.read()


def _mesh(processes: int) -> jax.sharding.Mesh | None:
    if not _MESH.value:
        if processes > 1:
            raise app.UsageError(f'{processes} processes need --mesh over all '
                                 f'{jax.device_count()} devices, e.g. '
                                 f'--mesh=expert={jax.device_count()}')
        return None
    try:
        return make_mesh(parse_mesh(_MESH.value))
    except MeshError as e:
        raise app.UsageError(f'--mesh: {e}') from None


def budget_line(engine: PagedEngine) -> str:
    """What warm-up measured for the token budget, in a line."""
    ms = {k: v * 1e3 for k, v in engine.budget_timings.items()}
    line = (f'--max_num_batched_tokens {engine.max_num_batched_tokens}, measured: a decode '
            f'call of {engine.max_batch} sequences {ms["decode"]:.1f} ms')
    ratios = engine.budget_ratios
    if not ratios:  # max_seq_len left one size
        return line + '; the only size that holds a token of every sequence'
    steps = ' / '.join(f'{ms["mixed " + str(T)]:.1f}' for T in ratios)
    line += (f'; steps of {" / ".join(map(str, ratios))} tokens {steps} ms '
             f'({" / ".join(f"{r:.2f}" for r in ratios.values())} of a decode call timed '
             f'beside each)')
    if engine.context_tokens is not None:
        deep = next(k for k in ms if ' at ' in k)  # 'mixed T at D'
        line += (f'; a prompt token at context c counts 1 + c / {engine.context_tokens:.0f} '
                 f'tokens (a step of {deep[6:].replace(" at ", " tokens at context ")}: '
                 f'{ms[deep]:.1f} ms)')
    return line


def pool_line(engine: PagedEngine) -> str:
    """The KV page pool, as the server prints it at start-up."""
    line = (f'KV pages: {engine.num_pages - 1:,} of {engine.page_size} tokens '
            f'({(engine.num_pages - 1) * engine.page_size:,} tokens)')
    if engine.temp_bytes is not None:
        line += (f', {KV_MEMORY_FRACTION:.0%} of each device less what is in use and '
                 f'{engine.temp_bytes / 1e9:.2f} GB for the largest step\'s temporaries')
    return line


def speculation_line(engine: PagedEngine) -> str:
    """What warmup measured for speculation, as the server prints it."""
    costs = ', '.join(f'{rows} {cost:.2f}' for rows, cost in engine.spec_cost.items())
    return (f'--speculative_max_batch measured: a speculative decode call over a plain one, '
            f'by sequences: {costs}; a call speculates while a verify step emits at least '
            f'that many tokens per sequence')


def make_engine(cfg: GlmConfig, params: dict, mesh) -> PagedEngine:
    gb = _KV_CACHE_GB.value
    return PagedEngine(cfg, params, _MAX_BATCH.value, _MAX_SEQ_LEN.value, _STEPS.value,
                       page_size=_PAGE_SIZE.value,
                       kv_cache_bytes=None if gb is None else int(gb * 2 ** 30),
                       max_num_batched_tokens=_BATCHED_TOKENS.value,
                       prefix_caching=_PREFIX_CACHING.value,
                       speculative_tokens=_SPEC_TOKENS.value if _SPECULATIVE.value else 0,
                       speculative_max_batch=_SPEC_MAX_BATCH.value,
                       mesh=mesh, rules=_RULES.value)


def _lockstep_address() -> tuple[str, int]:
    """Process 0's host (the coordinator's) and the lockstep port on it."""
    host, _, port = distributed.coordinator_address().rpartition(':')
    return host.strip('[]'), _LOCKSTEP_PORT.value or int(port) + 1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    # JAX on a GPU takes 75% of its memory for the process by default; the server is the
    # device's one user, and its KV pool is sized from what the device says it may use.
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
    if not flags.FLAGS['verbosity'].present:
        # Start-up shows a progress bar, not absl's INFO lines (one per restored layer and
        # more): --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    from glmjax.serving.moderation import Moderation
    try:
        moderation = Moderation.load(_MODERATION.value)
    except ValueError as e:
        raise app.UsageError(f'--moderation_prompt: {e}') from None
    try:
        multi = distributed.initialize_from_flags()  # before anything touches a device
    except distributed.DistributedError as e:
        raise app.UsageError(str(e)) from None
    except (ValueError, RuntimeError) as e:  # no cluster detected, coordinator unreachable
        raise app.UsageError(f'cannot join the other processes: {e}') from None
    process = jax.process_index()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # A follower keeps following: the leader's drain still needs it.
        signal.signal(sig, (lambda *_: stop.set()) if process == 0 else signal.SIG_IGN)
    compile_cache.enable()  # a restart loads the compiled buckets instead of compiling them
    mesh = _mesh(jax.process_count())
    cfg, params, tokenizer, name = load_model(_CHECKPOINT.value, _HF_DIR.value, _DTYPE.value,
                                              mesh, _RULES.value)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise app.UsageError(f'the tokenizer has {tokenizer.vocab_size} tokens but the model '
                             f'only {cfg.vocab_size}')
    try:
        engine = paged = make_engine(cfg, params, mesh)
    except (ValueError, RulesError) as e:
        raise app.UsageError(str(e)) from None
    print(f'glmjax-serve: {pool_line(paged)}', flush=True)
    leader = None
    if multi:
        address = _lockstep_address()
        if process > 0:
            print(f'glmjax-serve: process {process} follows process 0 at '
                  f'{address[0]}:{address[1]}', flush=True)
            try:
                code = lockstep.follow(engine, process, address, _PEER_TIMEOUT.value)
            except lockstep.Diverged as e:  # the engine's traceback is in the log above
                print(f'glmjax-serve: process {process} cannot follow process 0: {e}; '
                      'exiting', flush=True)
                logging.flush()
                sys.exit(1)
            print(f'glmjax-serve: process {process} stopped', flush=True)
            logging.flush()
            sys.exit(code)
        leader = lockstep.Leader(address[1], jax.process_count() - 1, _PEER_TIMEOUT.value)
        engine = lockstep.LeaderEngine(engine, leader)
    api_key = _API_KEY.value or os.environ.get('GLMJAX_API_KEY')
    server = GlmServer(engine, tokenizer, cfg, name, _MAX_QUEUE.value, _HOST.value,
                       _PORT.value, api_key, _tls(),
                       chat_template=chat_template(_CHECKPOINT.value or _HF_DIR.value),
                       served_names=tuple(_SERVED_NAMES.value), moderation=moderation).start()
    print(f'glmjax-serve: listening on {_HOST.value}:{server.port} (warming up)', flush=True)
    http = None
    if _HTTP_PORT.value >= 0:
        tls_files = (_TLS_CERT.value, _TLS_KEY.value) if _TLS_CERT.value else None
        http = start_http(server, api_key, _HTTP_HOST.value, _HTTP_PORT.value, tls_files)
        scheme = 'https' if tls_files else 'http'
        print(f'glmjax-serve: HTTP API on {scheme}://{_HTTP_HOST.value}:{http.port}/v1 '
              f'(models: {", ".join(http.backend.served_names)})', flush=True)
    lost = threading.Event()

    def fail(message: str) -> None:
        server.fail(message)
        lost.set()

    try:
        if leader is not None:
            leader.start(on_failure=fail)
        if not stop.is_set():
            server.warmup(Progress('compiling', 1))
            if paged.measures_budget:
                print(f'glmjax-serve: {budget_line(paged)}', flush=True)
            if paged.measures_speculation:
                print(f'glmjax-serve: {speculation_line(paged)}', flush=True)
            print(f'glmjax-serve: serving {name} on port {server.port}', flush=True)
    except EngineLost as e:
        fail(str(e))
    while not stop.wait(0.5) and not lost.is_set():  # a timeout keeps signals responsive
        pass
    if lost.is_set():
        print(f'glmjax-serve: cannot serve: {server.failure}; exiting', flush=True)
        time.sleep(FAILURE_LINGER_S)
        logging.flush()
        os._exit(lockstep.EXIT_PEER_LOST)  # the engine thread may be stuck in a collective
    print('glmjax-serve: shutting down, draining in-flight requests', flush=True)
    drained = server.shutdown(_GRACE.value)
    if leader is not None:
        leader.close()
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
