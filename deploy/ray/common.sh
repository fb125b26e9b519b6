# Shared by start-head.sh and start-worker.sh (sourced, not run).
# shellcheck shell=bash

die() {
  echo "error: $*" >&2
  exit 2
}

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# role_args ROLE GPUS SLOTS: sets ROLE_ARGS to the `ray start` flags of a node that hosts
# ROLE workers. The node advertises the custom resource "<ROLE>_gpu" with one unit per
# GPU (SLOTS overrides; a node without GPUs offers one slot), and `pdserve serve` asks
# for one unit per worker, so each role's workers land on its own nodes.
role_args() {
  local role=$1 gpus=$2 slots=$3
  [[ $role == prefill || $role == decode ]] || die "--role must be prefill or decode, got '$role'"
  [[ -n $gpus ]] || gpus=$(gpu_count)
  [[ $gpus =~ ^[0-9]+$ ]] || die "--gpus must be a count, got '$gpus'"
  if [[ -z $slots ]]; then
    slots=$gpus
    ((slots > 0)) || slots=1
  fi
  [[ $slots =~ ^[1-9][0-9]*$ ]] || die "--slots must be a positive count, got '$slots'"
  # shellcheck disable=SC2034  # read by the script that sources this file
  ROLE_ARGS=(--num-gpus "$gpus" --resources "{\"${role}_gpu\": $slots}")
}
