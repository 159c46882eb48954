#!/usr/bin/env bash
# Starts a multi-process glmjax server on this machine: N processes, each with simulated CPU
# devices, one mesh over all of them. This is how multi-host serving is tested without a pod.
#
#   launch/local.sh --processes 2 --devices_per_process 4 --mesh expert=4,tensor=2
#   launch/local.sh --dry_run            # print the commands only
set -euo pipefail

processes=2
devices=4
mesh="expert=4,tensor=2"
checkpoint=""
grpc_port=50051
http_port=8000
coordinator_port=12355
serve="${GLMJAX_SERVE:-glmjax-serve}"
dry_run=0

usage() { sed -n '2,8p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices_per_process) devices="$2"; shift 2 ;;
    --mesh) mesh="$2"; shift 2 ;;
    --checkpoint) checkpoint="$2"; shift 2 ;;
    --grpc_port) grpc_port="$2"; shift 2 ;;
    --http_port) http_port="$2"; shift 2 ;;
    --coordinator_port) coordinator_port="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "local.sh: unknown flag $1" >&2; usage 2 ;;
  esac
done

command_for() {  # the command line of process $1
  local args=("$serve" --coordinator_address "127.0.0.1:${coordinator_port}"
              --num_processes "$processes" --process_id "$1" --mesh "$mesh"
              --grpc_port "$grpc_port" --http_port "$http_port")
  [[ -n "$checkpoint" ]] && args+=(--checkpoint "$checkpoint")
  echo "env JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=${devices} $(printf '%q ' "${args[@]}")"
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < processes; i++)); do command_for "$i"; done
  exit 0
fi

pids=()
# shellcheck disable=SC2329  # called by the trap
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for ((i = 0; i < processes; i++)); do
  bash -c "$(command_for "$i")" &
  pids+=($!)
done
echo "glmjax: ${processes} processes; gRPC on 127.0.0.1:${grpc_port}, HTTP on 127.0.0.1:${http_port}" >&2
# The first process to fail takes the others down: a partial mesh cannot serve.
wait -n "${pids[@]}"
status=$?
exit "$status"
