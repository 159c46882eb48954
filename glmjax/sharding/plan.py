"""glmjax-plan: does a model fit a mesh, and how many tokens of KV cache are left?

It compiles the real decode step (`glmjax.decode`) and the paged engine's largest step (a
ragged batch of --max_num_batched_tokens prompt tokens, `paged_forward`) against abstract,
sharded inputs on a simulated mesh of CPU devices (nothing is allocated) and reads XLA's
per-device memory analysis. Example:

    glmjax-plan --config glm-4.6 --mesh expert=8 --device_memory_gb 141 --weight_dtype bf16

The arithmetic, per device:
  weights      the shard of every parameter (MTP layer included), exact from the shardings
  KV cache     max_batch x max_seq_len tokens; a token costs layers x 2 (k, v) x KV heads on
               this device x head_dim x bytes
  temporaries  from the compiles (see below): the larger of the two steps
  fits         weights + temporaries + one sequence of max_seq_len in KV pages <= device
               memory (the paged engine holds what fits and preempts the rest; that every
               row at full length fits too, weights + KV cache + temporaries, is reported)
  capacity     (device memory - weights - temporaries) / KV bytes per token on a device,
               times the data axis (each data shard holds different rows)

Compiling all 92 layers of GLM-4.6 takes over a minute on CPU, so the step is compiled with
first_k_dense_replace + 1 and + 2 layers, and every per-device size X is extrapolated as
X(L) = X(a) + (L - a) (X(a + 1) - X(a)). This is exact, not an estimate: the layers beyond
the dense ones are identical in shape, code and sharding (compiling all 92 gives the same
bytes). The compile's argument bytes must equal weights (without MTP, unused by decode) +
KV cache + tokens; the report shows both.

Temporaries: XLA:CPU keeps fp32 copies of bf16/fp8 weights for its dots, and keeps every
layer's copies live at once, so its temp_size_in_bytes for the full depth is far above what
a GPU/TPU step needs; it is reported but not counted. What is counted is the temporaries of
the smallest compile (the dense layers + 1 MoE layer), an accelerator running the layers one
after another, with fp32 weights and KV of the same shapes and shardings: so no copies of
them, and fp32 activations, about twice an accelerator's bf16 ones (XLA:CPU's MoE and attention
implementations; 1-byte weights' dequantized copies are not counted). A step of many prompt
tokens needs more than a decode step: glmjax-serve measures its budget up to
MAX_MEASURED_BUDGET tokens. Sizing its pool itself, it takes KV_MEMORY_FRACTION of a device
less the weights and the temporaries of its largest programs, compiled on the device; the
report gives that pool from these temporaries. Memory sizes are decimal: 1 GB = 1e9 bytes.
"""

import json
import math
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from glmjax.cache import cache_shapes, kv_bytes_per_token
from glmjax.config import PRESETS as CONFIG_PRESETS
from glmjax.config import ConfigError, GlmConfig
from glmjax.inference import decode
from glmjax.mesh_axes import DATA
from glmjax.model import abstract_params, param_axes
from glmjax.paged_inference import init_pages, paged_forward
from glmjax.serving.paged_engine import KV_MEMORY_FRACTION, MAX_MEASURED_BUDGET
from glmjax.sharding.compiled import full_depth, memory_sizes, truncated
from glmjax.sharding.mesh import MeshError, check_axis_sizes, format_mesh, make_mesh, parse_mesh
from glmjax.sharding.rules import (
    DEFAULT_RULES,
    PRESETS,
    RulesError,
    bytes_per_device,
    cache_shardings,
    get_rules,
    pages_shardings,
    param_shardings,
    partition_spec,
    with_shardings,
)

# fp8 weights are planned as int8: the same bytes, and the model's matmuls promote int8 to
# bf16 (JAX refuses to promote fp8 implicitly). Only the sizes matter here.
WEIGHT_DTYPES = {'bf16': jnp.bfloat16, 'fp8': jnp.int8, 'int8': jnp.int8}
KV_DTYPES = {'bf16': jnp.bfloat16, 'fp16': jnp.float16, 'fp32': jnp.float32,
             'fp8': jnp.float8_e4m3fn, 'int8': jnp.int8}
GB = 1e9

def planned_params(cfg: GlmConfig, weight_dtype) -> dict:
    """Abstract bf16 params; with a 1-byte weight dtype the matrices (2+ dims, except the
    vocabulary-sized embedding and lm_head and the fp32 router) take that dtype, as in the
    FP8 release."""
    def one(axes, s):
        quantized = len(s.shape) >= 2 and 'vocab' not in axes and s.dtype != jnp.float32
        return jax.ShapeDtypeStruct(s.shape, weight_dtype if quantized else s.dtype)

    return jax.tree.map(one, param_axes(cfg), abstract_params(cfg, jnp.bfloat16),
                        is_leaf=lambda x: isinstance(x, tuple))


def token_shapes(mesh, rules, batch: int) -> jax.ShapeDtypeStruct:
    """The decode step's input tokens [B], rows split like the cache's."""
    spec, _ = partition_spec(get_rules(rules), mesh, ('batch',), (batch,), 'tokens')
    return jax.ShapeDtypeStruct((batch,), jnp.int32,
                                sharding=jax.sharding.NamedSharding(mesh, spec))


def compile_decode(cfg, mesh, params, kv_dtype, rules, batch, seq_len):
    """Per-device memory analysis of the decode step for these abstract sharded params."""
    cache = cache_shapes(cfg, batch, seq_len, kv_dtype)
    cache = with_shardings(cache, cache_shardings(cfg, mesh, cache, rules))
    with jax.set_mesh(mesh):
        return memory_sizes(decode.lower(cfg, params, token_shapes(mesh, rules, batch), cache))


def compile_paged_step(cfg, mesh, params, kv_dtype, rules, tokens: int, rows: int,
                       seq_len: int, page_size: int):
    """Per-device memory analysis of the paged engine's largest step: a ragged batch of
    `tokens` prompt tokens over `rows` rows (`paged_forward`; its pool, an argument, holds
    one sequence of seq_len)."""
    M = -(-seq_len // page_size)
    pages = jax.eval_shape(lambda: init_pages(cfg, M + 1, page_size, kv_dtype))
    pages = with_shardings(pages, pages_shardings(cfg, mesh, pages, rules))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())

    def i32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=replicated)

    with jax.set_mesh(mesh):
        return memory_sizes(paged_forward.lower(cfg, params, i32(tokens), i32(tokens), pages,
                                                i32(rows), i32(rows, M), i32(rows + 1), i32(1)))


def compiled_sizes(cfg: GlmConfig, mesh, params: dict, kv_dtype, rules, batch: int,
                   seq_len: int) -> tuple[dict, dict, list[int]]:
    """Compiled sizes at full depth (extrapolated, see the module docstring), the sizes of
    the smallest compile, and the layer counts compiled."""
    def sizes_at(n):
        small_cfg, small_params = truncated(cfg, n, params)
        return compile_decode(small_cfg, mesh, small_params, kv_dtype, rules, batch, seq_len)

    return full_depth(cfg, sizes_at)


def plan(cfg: GlmConfig, axis_sizes: dict[str, int], device_memory_bytes: float,
         weight_dtype='bf16', kv_dtype='bf16', max_batch: int = 1, max_seq_len: int = 32768,
         rules: str = DEFAULT_RULES, page_size: int = 16,
         step_tokens: int = MAX_MEASURED_BUDGET) -> dict:
    """The plan as a dict (what --json prints). JAX must already see the mesh's devices."""
    mesh = make_mesh(axis_sizes)
    wdtype, kvdtype = WEIGHT_DTYPES[weight_dtype], KV_DTYPES[kv_dtype]
    params = with_shardings(planned_params(cfg, wdtype),
                            param_shardings(cfg, mesh, rules, mtp=None))
    weights = bytes_per_device(params)
    cache = cache_shapes(cfg, max_batch, max_seq_len, kvdtype)
    kv_cache = bytes_per_device(with_shardings(cache, cache_shardings(cfg, mesh, cache, rules)))
    data = mesh.shape[DATA]
    one_token = cache_shapes(cfg, data, 1, kvdtype)  # one token per row on each data shard
    one_token = with_shardings(one_token, cache_shardings(cfg, mesh, one_token, rules))
    kv_token_device = bytes_per_device((one_token.k, one_token.v))
    # The serving engine's KV pages: one pool per layer, heads split as the cache's,
    # pages not split, so every device holds a slice of every page.
    one_page = jax.eval_shape(lambda: init_pages(cfg, 1, page_size, kvdtype))
    page_device = bytes_per_device(with_shardings(
        one_page, pages_shardings(cfg, mesh, one_page, rules)))

    full, smallest, counts = compiled_sizes(cfg, mesh, params, kvdtype, rules, max_batch,
                                            max_seq_len)
    # Temporaries from fp32 weights and KV of the same shapes and shardings (see the
    # docstring); the decode step's outputs (its new cache) at the real dtypes.
    small_cfg, fp32 = truncated(cfg, counts[0], jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding), params))
    decode_temps = (compile_decode(small_cfg, mesh, fp32, jnp.float32, rules, max_batch,
                                   max_seq_len)['temp'] + smallest['outputs'])
    step = compile_paged_step(small_cfg, mesh, fp32, jnp.float32, rules, step_tokens,
                              max_batch, max_seq_len, page_size)
    step_temps = step['temp'] + step['outputs']
    temps = max(decode_temps, step_temps)
    # glmjax-serve's own pool: KV_MEMORY_FRACTION of a device less the weights and its
    # programs' temporaries, which it compiles on the device (these are an upper bound).
    serve_free = KV_MEMORY_FRACTION * device_memory_bytes - weights - temps
    decode_weights = bytes_per_device(params['model'])
    free = device_memory_bytes - weights - temps
    used = weights + kv_cache + temps
    return {
        'mesh': {a: mesh.shape[a] for a in mesh.axis_names}, 'devices': mesh.size,
        'rules': rules, 'weight_dtype': weight_dtype, 'kv_dtype': kv_dtype,
        'max_batch': max_batch, 'max_seq_len': max_seq_len,
        'params': sum(math.prod(s.shape) for s in jax.tree.leaves(params)),
        'device_memory_bytes': int(device_memory_bytes),
        'weights_bytes_per_device': weights,
        'kv_bytes_per_token': kv_bytes_per_token(cfg, kvdtype),
        'kv_bytes_per_token_per_device': kv_token_device,
        'kv_cache_bytes_per_device': kv_cache,
        'temp_bytes_per_device': temps,
        'decode_temp_bytes_per_device': decode_temps,
        'step_tokens': step_tokens,
        'step_temp_bytes_per_device': step_temps,
        'serve_default_pool_tokens': int(max(serve_free, 0) // page_device) * page_size,
        'cpu_temp_bytes_full_depth': full['temp'],
        'compiled_argument_bytes_per_device': full['arguments'],
        'expected_argument_bytes_per_device': decode_weights + kv_cache
        + bytes_per_device(token_shapes(mesh, rules, max_batch)),
        'layers_compiled': counts,
        'used_bytes_per_device': used,
        'fits': bool(free >= page_device * -(-max_seq_len // page_size)),
        'every_row_full_fits': bool(used <= device_memory_bytes),
        'kv_token_capacity': int(max(free, 0) // kv_token_device * data),
        'page_size': page_size,
        'kv_page_bytes_per_device': page_device,
        'kv_page_capacity': int(max(free, 0) // page_device),
        'kv_page_token_capacity': int(max(free, 0) // page_device) * page_size,
        'sequences_of_max_seq_len': int(max(free, 0) // page_device)
        // -(-max_seq_len // page_size),
        # glmjax-serve's --kv_cache_gb for that pool: the pool's logical size (whole tokens),
        # in GiB, rounded down.
        'kv_cache_gb_flag': math.floor(int(max(free, 0) // page_device) * page_size
                                       * kv_bytes_per_token(cfg, kvdtype) / 2 ** 30 * 10) / 10,
    }


def report(cfg_name: str, p: dict) -> str:
    g = lambda n: f'{n / GB:9.2f} GB'  # noqa: E731
    L = ', '.join(map(str, p['layers_compiled']))
    full = 'fits' if p['every_row_full_fits'] else 'does not fit'
    if p['fits']:
        verdict = (f"FITS: room for {p['sequences_of_max_seq_len']:,} sequences of "
                   f"{p['max_seq_len']:,} tokens at once in KV pages"
                   + ('' if p['sequences_of_max_seq_len'] >= p['max_batch'] else
                      f" (of max_batch {p['max_batch']}: the others wait, or are preempted "
                      'when sequences grow)'))
    else:
        verdict = (f"DOES NOT FIT: the weights and temporaries leave no room for one "
                   f"sequence of {p['max_seq_len']:,} tokens")
    lines = [
        f"{cfg_name} on mesh {format_mesh(p['mesh'])} ({p['devices']} devices, rules "
        f"{p['rules']}), weights {p['weight_dtype']}, KV cache {p['kv_dtype']}, "
        f"{p['params'] / 1e9:.1f}B parameters",
        'per device:',
        f"  weights     {g(p['weights_bytes_per_device'])}  every parameter's shard "
        '(MTP included), from the shardings',
        f"  KV cache    {g(p['kv_cache_bytes_per_device'])}  {p['max_batch']} rows x "
        f"{p['max_seq_len']} tokens x {p['kv_bytes_per_token_per_device']} B per token on "
        f"a device (a token's whole KV: {p['kv_bytes_per_token']} B)",
        f"  temporaries {g(p['temp_bytes_per_device'])}  the larger of the "
        f"{p['layers_compiled'][0]}-layer compiles (XLA:CPU, fp32 activations): a "
        f"step of {p['step_tokens']:,} prompt tokens {g(p['step_temp_bytes_per_device']).strip()}"
        f", a decode step {g(p['decode_temp_bytes_per_device']).strip()}",
        f"  total       {g(p['used_bytes_per_device'])}  of {g(p['device_memory_bytes'])} "
        f'with every row at full length: {full}',
        verdict,
        f"KV capacity: ({g(p['device_memory_bytes']).strip()} - weights - temporaries) / "
        f"{p['kv_bytes_per_token_per_device']} B per token x data {p['mesh'][DATA]} = "
        f"{p['kv_token_capacity']:,} tokens",
        f"KV pages of {p['page_size']} tokens: {p['kv_page_capacity']:,} pages "
        f"of {p['kv_page_bytes_per_device']:,} B on a device = "
        f"{p['kv_page_token_capacity']:,} tokens, {p['sequences_of_max_seq_len']:,} "
        f"sequences of {p['max_seq_len']:,} tokens at once (prefix sharing fits more); "
        f"glmjax-serve --kv_cache_gb {p['kv_cache_gb_flag']} makes that pool",
        f'compiled with {L} layers, extrapolated to the full depth: arguments '
        f"{g(p['compiled_argument_bytes_per_device']).strip()} (expected weights without "
        f"MTP + KV cache + tokens = {g(p['expected_argument_bytes_per_device']).strip()}); "
        f"XLA:CPU temporaries {g(p['cpu_temp_bytes_full_depth']).strip()} (inflated by fp32 "
        'weight copies; not counted)',
    ]
    share = f'{KV_MEMORY_FRACTION:.0%} of a device less the weights and temporaries'
    if p['serve_default_pool_tokens'] < p['max_seq_len']:
        fix = (f"give it --kv_cache_gb {p['kv_cache_gb_flag']} (the pool above, no margin), "
               'or a smaller --max_num_batched_tokens' if p['fits'] else
               'a smaller --max_num_batched_tokens needs less')
        lines.append(f"note: glmjax-serve's default pool ({share}) holds "
                     f"{p['serve_default_pool_tokens']:,} tokens, less than one sequence of "
                     f"{p['max_seq_len']:,}: {fix}")
    else:
        lines.append(f"glmjax-serve's default pool ({share}): "
                     f"{p['serve_default_pool_tokens']:,} tokens")
    if p['devices'] > 1 and p['kv_bytes_per_token_per_device'] == p['kv_bytes_per_token'] \
            and p['mesh'].get('expert', 1) > 1:
        lines.append(f"note: every device holds the whole KV cache and all of the attention "
                     f"(rules {p['rules']} split kv heads over no mesh axis of this mesh); "
                     '--rules ep_tp splits them over `expert` as well')
    return '\n'.join(lines)


def define_flags() -> None:
    """The command's flags; defined when it runs, so that importing this module is free."""
    flags.DEFINE_string('config', 'glm-4.6', 'a config.json (or checkpoint directory), or a '
                        f'preset: {", ".join(CONFIG_PRESETS)}')
    flags.DEFINE_string('mesh', 'expert=8', 'mesh axis sizes, e.g. expert=4,tensor=2')
    flags.DEFINE_enum('rules', DEFAULT_RULES, list(PRESETS), 'sharding rules preset')
    flags.DEFINE_float('device_memory_gb', 80.0, 'memory of one device, in GB (1e9 bytes)')
    flags.DEFINE_enum('weight_dtype', 'bf16', list(WEIGHT_DTYPES),
                      'weights; fp8/int8 apply to the matrices (not the embedding, lm_head or '
                      'router); quantization scales are not counted')
    flags.DEFINE_enum('kv_dtype', 'bf16', list(KV_DTYPES), 'KV cache dtype')
    flags.DEFINE_integer('max_batch', 1, 'decode slots (rows of the KV cache)')
    flags.DEFINE_integer('max_seq_len', 32768, 'cache length of each row')
    flags.DEFINE_integer('page_size', 16, 'tokens per KV page of the paged engine')
    flags.DEFINE_integer('max_num_batched_tokens', MAX_MEASURED_BUDGET, 'tokens of the paged '
                         "engine's largest step (glmjax-serve's flag; by default it measures "
                         f'one up to {MAX_MEASURED_BUDGET})')
    flags.DEFINE_bool('json', False, 'print one JSON object instead of the report')


def load_config(name: str) -> GlmConfig:
    return GlmConfig.preset(name) if name in CONFIG_PRESETS else GlmConfig.from_hf(name)


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        axis_sizes = parse_mesh(f.mesh)
        # The simulated devices must exist before JAX starts its backend: set them first.
        jax.config.update('jax_platforms', 'cpu')
        jax.config.update('jax_num_cpu_devices', math.prod(check_axis_sizes(axis_sizes)))
        cfg = load_config(f.config)
        result = plan(cfg, axis_sizes, f.device_memory_gb * GB, f.weight_dtype, f.kv_dtype,
                      f.max_batch, f.max_seq_len, f.rules, f.page_size,
                      f.max_num_batched_tokens)
    except (ConfigError, MeshError, RulesError) as e:
        sys.exit(f'glmjax-plan: {e}')
    print(json.dumps({'config': f.config, **result}) if f.json else report(f.config, result))


def run():
    define_flags()
    app.run(main)


if __name__ == '__main__':
    run()
