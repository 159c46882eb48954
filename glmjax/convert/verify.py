"""glmjax-verify: transformers and glmjax on the same prompts, side by side.

    glmjax-verify --hf_dir /models/GLM-4.6-truncated [--checkpoint /ckpt/glm46]
                  [--mesh expert=4,tensor=2] [--prompt_ids 151331,151333,...]

Both run in fp32: transformers' Glm4MoeForCausalLM from --hf_dir, and glmjax from
--checkpoint (a glmjax-convert output, restored and cast to fp32) or, without it, from
--hf_dir through load_hf. Prints per prompt the largest logit difference, the KL divergence
KL(transformers || glmjax) per position (mean and max), and how often the greedy (argmax)
tokens agree. Exits 1 when the largest difference exceeds --atol (1e-4: the fp32 parity
tolerance; a bf16 checkpoint of a bf16 source is lossless, so the same tolerance holds),
2 on bad input (a message on stderr).
Needs transformers and torch (`pip install -e '.[test]'`); a full-size model does not fit
one host in fp32, so verify a truncated copy (fewer layers).
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from glmjax.checkpoint import load_checkpoint
from glmjax.config import ConfigError, GlmConfig
from glmjax.hf import CheckpointError, load_hf
from glmjax.inference import forward
from glmjax.model import abstract_params, param_axes


def _define_flags():
    """Defined when the CLI runs, not on import: glmjax-convert has flags of the same names."""
    flags.DEFINE_string('hf_dir', None, 'Hugging Face checkpoint directory (the reference)')
    flags.DEFINE_string('checkpoint', None, 'glmjax-convert output to check (default: read '
                        '--hf_dir with load_hf)')
    flags.DEFINE_string('mesh', None, 'mesh axis sizes, e.g. expert=4,tensor=2 (on CPU, that '
                        'many devices are simulated)')
    flags.DEFINE_string('prompt_ids', None, 'prompts as comma-separated token ids, several '
                        'separated by ";" (default: 3 random prompts of 5 to 16 tokens)')
    flags.DEFINE_float('atol', 1e-4, 'largest logit difference allowed')
    flags.mark_flags_as_required(['hf_dir'])


def parse_mesh(spec: str) -> dict[str, int]:
    """'expert=4,tensor=2' -> {'expert': 4, 'tensor': 2}."""
    axes = {}
    for part in spec.split(','):
        name, eq, size = part.partition('=')
        if not eq or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f'--mesh {spec!r}: each axis must be name=size, e.g. expert=4')
        axes[name.strip()] = int(size)
    return axes


def make_mesh(axes: dict[str, int]) -> jax.sharding.Mesh:
    """sharding.make_mesh when that package is there, else a plain mesh (Auto axes)."""
    try:
        from glmjax.sharding import make_mesh as sharding_make_mesh
    except ImportError:
        auto = (jax.sharding.AxisType.Auto,) * len(axes)
        return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=auto)
    return sharding_make_mesh(axes)


# Until the sharding package is there: logical axis -> mesh axis, used where it divides.
SIMPLE_RULES = {'experts': 'expert', 'q_heads': 'tensor', 'kv_heads': 'tensor',
                'mlp': 'tensor', 'moe_mlp': 'tensor', 'vocab': 'tensor'}


def simple_shardings(cfg: GlmConfig, mesh: jax.sharding.Mesh, mtp: bool = True) -> dict:
    """NamedShardings from each parameter's logical axes by SIMPLE_RULES; a dimension the
    mesh axis does not divide (or an axis the mesh lacks) is replicated."""
    P = jax.sharding.PartitionSpec
    shapes = abstract_params(cfg, mtp=mtp)

    def one(axes, shape):
        spec = [SIMPLE_RULES.get(a) if SIMPLE_RULES.get(a) in mesh.shape
                and n % mesh.shape[SIMPLE_RULES[a]] == 0 else None
                for a, n in zip(axes, shape.shape)]
        return jax.sharding.NamedSharding(mesh, P(*spec))

    return jax.tree.map(one, param_axes(cfg, mtp=mtp), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def mesh_shardings(cfg: GlmConfig, mesh: jax.sharding.Mesh) -> dict:
    """sharding.param_shardings when that package is there, else `simple_shardings`; for
    the MTP layer too (loaders ignore it when a checkpoint has none)."""
    try:
        from glmjax.sharding import param_shardings
    except ImportError:
        return simple_shardings(cfg, mesh)
    return param_shardings(cfg, mesh, mtp=True)


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    """ours, ref: fp32 [T, V] logits. Max |diff|, KL(ref || ours) per position, argmax match."""
    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {'max_diff': float(np.abs(ours - ref).max()), 'kl_mean': float(kl.mean()),
            'kl_max': float(kl.max()),
            'greedy_agree': float((ours.argmax(-1) == ref.argmax(-1)).mean())}


def default_prompts(vocab: int) -> list[list[int]]:
    rng = np.random.RandomState(0)
    return [rng.randint(0, vocab, n).tolist() for n in (5, 11, 16)]


def glmjax_params(cfg: GlmConfig, hf_dir: str, checkpoint: str | None, mesh):
    shardings = None if mesh is None else mesh_shardings(cfg, mesh)
    if checkpoint is not None:
        return load_checkpoint(checkpoint, dtype=jnp.float32, shardings=shardings)
    return cfg, load_hf(hf_dir, cfg, jnp.float32, shardings)


def verify(hf_dir: str, checkpoint: str | None = None, mesh=None,
           prompts: list[list[int]] | None = None, atol: float = 1e-4, stream=None) -> bool:
    """Prints the comparison (to stdout by default); True when every prompt is within atol."""
    stream = stream or sys.stdout
    import torch
    from transformers import Glm4MoeForCausalLM

    cfg = GlmConfig.from_hf(hf_dir)
    cfg, params = glmjax_params(cfg, hf_dir, checkpoint, mesh)
    model = Glm4MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = prompts or default_prompts(cfg.vocab_size)
    ok = True
    for i, prompt in enumerate(prompts):
        ours = np.asarray(forward(cfg, params, jnp.asarray([prompt], jnp.int32)))[0]
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0].float().numpy()
        r = compare(ours, ref)
        ok &= r['max_diff'] <= atol and math.isfinite(r['max_diff'])
        print(f'prompt {i} ({len(prompt)} tokens): max |logit diff| {r["max_diff"]:.3g}  '
              f'KL mean {r["kl_mean"]:.3g} max {r["kl_max"]:.3g}  '
              f'greedy agreement {r["greedy_agree"]:.0%}', file=stream)
    print(f'{"PASS" if ok else "FAIL"}: tolerance {atol:g}', file=stream)
    return ok


def main(argv) -> int:
    if len(argv) > 1:
        print(f'glmjax-verify: error: unexpected arguments {argv[1:]}', file=sys.stderr)
        return 2
    f = flags.FLAGS
    if not f['verbosity'].present:  # Orbax logs every step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        mesh = None
        if f.mesh:
            axes = parse_mesh(f.mesh)
            # On CPU, simulate the devices; must happen before JAX starts its backends.
            jax.config.update('jax_num_cpu_devices', math.prod(axes.values()))
            mesh = make_mesh(axes)
        prompts = None
        if f.prompt_ids:
            prompts = [[int(t) for t in p.split(',') if t.strip()] for p in f.prompt_ids.split(';')]
        ok = verify(f.hf_dir, f.checkpoint, mesh, prompts, f.atol)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f'glmjax-verify: error: {e}', file=sys.stderr)
        return 2
    return 0 if ok else 1


def run():
    _define_flags()
    app.run(main)


if __name__ == '__main__':
    run()
