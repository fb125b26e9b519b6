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

# secrets_dir DIR: the absolute path of DIR (default $PDSERVE_SECRETS_DIR, else
# /etc/pdserve/secrets), where make-secrets.sh wrote the cluster's credentials.
secrets_dir() {
  local dir=${1:-${PDSERVE_SECRETS_DIR:-/etc/pdserve/secrets}}
  if [[ -d $dir ]]; then (cd "$dir" && pwd); else echo "$dir"; fi
}

# auth_env DIR INSECURE: exports what `ray start` (and every worker it starts: they inherit
# the environment) and `pdserve serve` need to authenticate: the cluster secret (worker
# gRPC, the KV plane) and Ray's token (GCS, dashboard, client), files in DIR. With
# INSECURE=1 (a laptop) nothing is authenticated.
auth_env() {
  local dir=$1 insecure=$2 f
  if [[ $insecure == 1 ]]; then
    echo "warning: --insecure: worker gRPC, the KV plane and Ray are unauthenticated" >&2
    unset PDSERVE_CLUSTER_SECRET_FILE RAY_AUTH_TOKEN_PATH
    export RAY_AUTH_MODE=disabled
    return
  fi
  for f in cluster-secret ray-auth-token; do
    [[ -r $dir/$f ]] || die "no $dir/$f: run deploy/ray/make-secrets.sh $dir once, copy $dir to every node (same path), or pass --secrets DIR; --insecure runs unauthenticated (a laptop)"
  done
  export PDSERVE_CLUSTER_SECRET_FILE=$dir/cluster-secret
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$dir/ray-auth-token
}
