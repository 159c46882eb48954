#!/usr/bin/env bash
# On an accelerator machine with the CUDA (or TPU) build of jax already installed: the parity
# test on the accelerator, then batch-1 and batch-64 decode and bandwidth utilisation of a
# real-width slice of GLM-4.6 (real hidden size, heads, experts and vocabulary, 4 layers,
# random bf16 weights), then the cost of MTP verify steps on the same slice. About 5 minutes
# on one H200 before the verify steps were added (not yet timed with them); never part of
# the test suite.
#
#   bash benchmarks/device_check.sh        # the log also goes to ${OUT:-/tmp}/device_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/device_check.log"
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"

"$python" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee "$log"
# fp32 parity needs full-precision matmuls: GPUs use TF32 for fp32 by default.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 "$python" -m pytest -q -x \
  -p no:cacheprovider tests/test_parity.py 2>&1 | tee -a "$log"
timeout 300 "$python" benchmarks/bench_slice.py --layers 4 --batches 1,64 \
  --dtype bfloat16 2>&1 | tee -a "$log"
# MTP speculation (issue 17): the cost of a verify step of k + 1 tokens against a 1-token
# step, at batch 1 and 64 (random weights accept nothing, so no speed-up is measured here).
timeout 300 "$python" benchmarks/bench_slice.py --layers 4 --batches 1,64 \
  --speculative_tokens 1,3 --dtype bfloat16 2>&1 | grep -E 'slice|verify' | tee -a "$log"
