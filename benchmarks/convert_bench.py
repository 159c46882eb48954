"""Conversion speed and memory: glmjax-convert on a generated checkpoint of a few GB.

    .venv/bin/python benchmarks/convert_bench.py [--size_gb 2.2] [--workers 2] [--dtype bf16]

Writes a GLM-shaped bf16 Hugging Face checkpoint (one safetensors file per layer, with an
index; random weights) into a temporary directory, evicts it from the page cache
(posix_fadvise DONTNEED), then reports
- raw read: every byte of the safetensors files read sequentially (the ceiling),
- convert: glmjax-convert run as a subprocess, source bytes / wall time, and its peak RSS
  next to the size of its largest item (one layer): the memory bound to check,
and deletes everything it wrote.
"""

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from glmjax.config import GlmConfig
from glmjax.hf import hf_tensor_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(size_gb: float) -> dict:
    """GLM-4.x-shaped, small width, enough MoE layers to reach size_gb in bf16."""
    raw = {
        'model_type': 'glm4_moe', 'architectures': ['Glm4MoeForCausalLM'], 'vocab_size': 32768,
        'hidden_size': 1024, 'intermediate_size': 4096, 'num_attention_heads': 16,
        'num_key_value_heads': 4, 'head_dim': 64, 'partial_rotary_factor': 0.5,
        'rope_theta': 1e6, 'rms_norm_eps': 1e-5, 'attention_bias': True, 'use_qk_norm': True,
        'moe_intermediate_size': 512, 'n_routed_experts': 64, 'n_shared_experts': 1,
        'num_experts_per_tok': 8, 'first_k_dense_replace': 1, 'norm_topk_prob': True,
        'routed_scaling_factor': 2.5, 'n_group': 1, 'topk_group': 1,
        'max_position_embeddings': 4096, 'num_nextn_predict_layers': 0,
        'tie_word_embeddings': False, 'hidden_act': 'silu', 'torch_dtype': 'bfloat16',
    }
    D, F, E, V = 1024, 512, 64, 32768
    moe_layer = 2 * (3 * E * D * F + 3 * D * F + 2 * D * 16 * 64 + 2 * D * 4 * 64)
    raw['num_hidden_layers'] = 1 + math.ceil((size_gb * 1e9 - 4 * V * D) / moe_layer)
    return raw


def write_checkpoint(path: str, raw: dict) -> int:
    """One safetensors file per layer (plus one for embedding and head), with an index."""
    os.makedirs(path)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(raw, f)
    cfg = GlmConfig.from_dict(raw)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    groups: dict[str, dict] = {}
    for name, shape in hf_tensor_shapes(cfg, mtp=False).items():
        parts = name.split('.')
        group = f'layer{int(parts[2]):03d}' if parts[1] == 'layers' else 'top'
        groups.setdefault(group, {})[name] = shape
    weight_map, offset, total = {}, 0, 0
    for group, shapes in groups.items():
        file = f'model-{group}.safetensors'
        tensors = {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            start = offset % (pool.size - n) if n < pool.size else 0
            data = pool[start:start + n] if n <= pool.size else np.resize(pool, n)
            tensors[name] = np.ascontiguousarray(data.reshape(shape))
            offset += 7919
            weight_map[name] = file
            total += tensors[name].nbytes
        if group.startswith('layer') and cfg.is_moe_layer(int(group[5:])):
            for name in tensors:  # router weight and correction bias are fp32 in GLM
                if name.endswith(('mlp.gate.weight', 'e_score_correction_bias')):
                    tensors[name] = tensors[name].astype(np.float32)
                    total += tensors[name].nbytes // 2
        save_file(tensors, os.path.join(path, file))
    with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
    return total


def evict(path: str) -> None:
    """Drops the files' pages from the page cache, so that reads come from the disk."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def raw_read(path: str) -> tuple[int, float]:
    buf = bytearray(64 << 20)
    total, start = 0, time.perf_counter()
    for name in sorted(os.listdir(path)):
        if name.endswith('.safetensors'):
            with open(os.path.join(path, name), 'rb', buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total, time.perf_counter() - start


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size_gb', type=float, default=2.2)
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--dtype', default='bf16', choices=['bf16', 'fp32'])
    parser.add_argument('--tmp', default=None, help='where to write (default: system temp)')
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix='glmjax_convert_bench_', dir=args.tmp)
    try:
        hf, out = os.path.join(base, 'hf'), os.path.join(base, 'out')
        raw = bench_config(args.size_gb)
        t = time.perf_counter()
        source = write_checkpoint(hf, raw)
        print(f'generated {source / 1e9:.2f} GB ({raw["num_hidden_layers"]} layers, '
              f'{raw["n_routed_experts"]} experts) in {time.perf_counter() - t:.0f} s')
        evict(hf)
        nbytes, secs = raw_read(hf)
        print(f'raw read (cold page cache): {nbytes / 1e9:.2f} GB in {secs:.1f} s = '
              f'{nbytes / 1e6 / secs:.0f} MB/s')
        evict(hf)
        cmd = [sys.executable, '-m', 'glmjax.convert.convert', '--hf_dir', hf, '--out', out,
               '--dtype', args.dtype, '--workers', str(args.workers)]
        t = time.perf_counter()
        r = subprocess.run(cmd, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True,
                           text=True)
        secs = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f'glmjax-convert failed:\n{r.stderr}')
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        largest = max(dir_size(os.path.join(out, 'params', d))
                      for d in os.listdir(os.path.join(out, 'params')))
        print(r.stderr.strip().splitlines()[-1])
        print(f'convert (cold page cache, --workers {args.workers}, --dtype {args.dtype}): '
              f'{nbytes / 1e9:.2f} GB in {secs:.1f} s wall (process start included) = '
              f'{nbytes / 1e6 / secs:.0f} MB/s')
        print(f'peak RSS of glmjax-convert: {peak / 1e9:.2f} GB; largest item on disk: '
              f'{largest / 1e9:.2f} GB; output {dir_size(out) / 1e9:.2f} GB')
    finally:
        shutil.rmtree(base, ignore_errors=True)
        print(f'removed {base}')


if __name__ == '__main__':
    main()
