#!/usr/bin/env bash
# Serves glmjax on a Cloud TPU pod slice: every worker runs the same program; JAX finds the
# other workers itself (--distributed_auto: jax.distributed.initialize with no arguments on
# TPU VMs). Worker 0 serves gRPC and HTTP; the others follow it step by step.
#
#   launch/tpu_pod.sh --name glm --zone us-east5-a --project my-proj \
#       --accelerator_type v5p-64 --checkpoint gs://bucket/glm-4.6-orbax --create
#   add --dry_run to print the gcloud commands only
set -euo pipefail

name=""
zone=""
project=""
accelerator_type="v5p-64"
runtime_version="v2-alpha-tpuv5"
checkpoint=""
mesh="expert=8,tensor=4"
grpc_port=50051
http_port=8000
package="glmjax"
create=0
dry_run=0

usage() { sed -n '2,9p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator_type) accelerator_type="$2"; shift 2 ;;
    --runtime_version) runtime_version="$2"; shift 2 ;;
    --checkpoint) checkpoint="$2"; shift 2 ;;
    --mesh) mesh="$2"; shift 2 ;;
    --grpc_port) grpc_port="$2"; shift 2 ;;
    --http_port) http_port="$2"; shift 2 ;;
    --package) package="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "tpu_pod.sh: unknown flag $1" >&2; usage 2 ;;
  esac
done
for required in name zone project checkpoint; do
  if [[ -z "${!required}" ]]; then
    echo "tpu_pod.sh: --${required} is required" >&2
    exit 2
  fi
done

run() {
  if [[ "$dry_run" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
where=(--zone "$zone" --project "$project")

if [[ "$create" == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
    --accelerator-type "$accelerator_type" --version "$runtime_version"
fi
# Each worker pulls the checkpoint next to itself, then all start together.
remote="pip install -q '${package}' 'jax[tpu]' && mkdir -p /tmp/glmjax-ckpt && \
gcloud storage rsync -r '${checkpoint}' /tmp/glmjax-ckpt && \
nohup glmjax-serve --distributed_auto --checkpoint /tmp/glmjax-ckpt --mesh '${mesh}' \
--grpc_port ${grpc_port} --http_port ${http_port} > /tmp/glmjax-serve.log 2>&1 &"
run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$remote"
if [[ "$dry_run" == 1 ]]; then
  echo "# endpoint: worker 0, gRPC port ${grpc_port}, HTTP port ${http_port}"
else
  ip=$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" \
    --format='value(networkEndpoints[0].ipAddress)')
  echo "glmjax: gRPC ${ip}:${grpc_port}  HTTP http://${ip}:${http_port}/v1"
fi
