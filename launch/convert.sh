#!/usr/bin/env bash
# Converts a Hugging Face checkpoint into a glmjax (Orbax) checkpoint as a job on a
# big-memory host next to the accelerators: pulls the safetensors (gs:// or a path), runs
# glmjax-convert with --resume (a rerun after a crash or preemption keeps what is done; the
# converter checks every item it writes and marks the checkpoint COMPLETE last), and pushes
# the result to --out (gs:// or a path).
#
#   launch/convert.sh --hf_dir gs://bucket/GLM-4.6 --out gs://bucket/glm-4.6-orbax
#   launch/convert.sh ... --slurm --mem 64G     # submit the same as a SLURM job
#   add --dry_run to print the commands only
set -euo pipefail

hf_dir=""
out=""
dtype="bf16"
workers=8
scratch="${TMPDIR:-/tmp}/glmjax-convert"
slurm=0
mem="64G"
time_limit="1-00:00:00"
dry_run=0

usage() { sed -n '2,10p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hf_dir) hf_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --scratch) scratch="$2"; shift 2 ;;
    --slurm) slurm=1; shift ;;
    --mem) mem="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "convert.sh: unknown flag $1" >&2; usage 2 ;;
  esac
done
for required in hf_dir out; do
  if [[ -z "${!required}" ]]; then
    echo "convert.sh: --${required} is required" >&2
    exit 2
  fi
done
case "$dtype" in bf16|fp32|fp8|int8) ;; *)
  echo "convert.sh: --dtype must be bf16, fp32, fp8 or int8, got ${dtype}" >&2; exit 2 ;;
esac

run() {
  if [[ "$dry_run" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ "$slurm" == 1 ]]; then
  # The same script on a compute node; the conversion needs memory, not accelerators.
  run sbatch --job-name=glmjax-convert --nodes=1 --ntasks=1 --cpus-per-task="$workers" \
    --mem="$mem" --time="$time_limit" --requeue \
    --wrap="$(printf '%q ' "$0" --hf_dir "$hf_dir" --out "$out" --dtype "$dtype" \
      --workers "$workers" --scratch "$scratch")"
  exit 0
fi

src="$hf_dir"
if [[ "$hf_dir" == gs://* ]]; then
  src="${scratch}/hf"
  run mkdir -p "$src"
  run gcloud storage rsync -r "$hf_dir" "$src"  # a rerun fetches only what is missing
fi
dst="$out"
if [[ "$out" == gs://* ]]; then
  dst="${scratch}/orbax"
fi
run glmjax-convert --hf_dir "$src" --out "$dst" --dtype "$dtype" --workers "$workers" --resume
if [[ "$out" == gs://* ]]; then
  run gcloud storage rsync -r "$dst" "$out"
fi
echo "glmjax: converted ${hf_dir} -> ${out}" >&2
