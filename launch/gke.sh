#!/usr/bin/env bash
# Renders launch/gke/glmjax-tpu.yaml and applies it with kubectl.
#
#   launch/gke.sh --image us-docker.pkg.dev/p/r/glmjax:latest --checkpoint gs://b/glm-4.6 \
#       --tpu_accelerator tpu-v5p-slice --tpu_topology 2x4x4 --hosts 8
#   add --dry_run to print the manifest and the kubectl command only
set -euo pipefail

NAME=glmjax
REPLICAS=1
HOSTS=4
CHIPS_PER_HOST=4
TPU_ACCELERATOR=tpu-v5p-slice
TPU_TOPOLOGY=2x2x4
MESH="expert=8,tensor=2"
IMAGE=""
CHECKPOINT=""
dry_run=0

usage() { sed -n '2,7p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --replicas) REPLICAS="$2"; shift 2 ;;
    --hosts) HOSTS="$2"; shift 2 ;;
    --chips_per_host) CHIPS_PER_HOST="$2"; shift 2 ;;
    --tpu_accelerator) TPU_ACCELERATOR="$2"; shift 2 ;;
    --tpu_topology) TPU_TOPOLOGY="$2"; shift 2 ;;
    --mesh) MESH="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --checkpoint) CHECKPOINT="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "gke.sh: unknown flag $1" >&2; usage 2 ;;
  esac
done
for required in IMAGE CHECKPOINT; do
  if [[ -z "${!required}" ]]; then
    echo "gke.sh: --$(tr '[:upper:]' '[:lower:]' <<< "$required") is required" >&2
    exit 2
  fi
done

template="$(dirname "$0")/gke/glmjax-tpu.yaml"
manifest=$(sed -e "s|\${NAME}|${NAME}|g" -e "s|\${REPLICAS}|${REPLICAS}|g" \
  -e "s|\${HOSTS}|${HOSTS}|g" -e "s|\${CHIPS_PER_HOST}|${CHIPS_PER_HOST}|g" \
  -e "s|\${TPU_ACCELERATOR}|${TPU_ACCELERATOR}|g" -e "s|\${TPU_TOPOLOGY}|${TPU_TOPOLOGY}|g" \
  -e "s|\${MESH}|${MESH}|g" -e "s|\${IMAGE}|${IMAGE}|g" -e "s|\${CHECKPOINT}|${CHECKPOINT}|g" \
  "$template")
if [[ "$dry_run" == 1 ]]; then
  echo "$manifest"
  echo "# kubectl apply -f -"
  exit 0
fi
kubectl apply -f - <<< "$manifest"
echo "glmjax: kubectl get svc ${NAME} for the gRPC (50051) and HTTP (8000) endpoint" >&2
