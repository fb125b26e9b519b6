#!/usr/bin/env bash
# Join an on-prem pdserve Ray cluster as a prefill or a decode node.
#
#   deploy/ray/start-worker.sh --role prefill|decode --address HEAD_IP:6379 [--gpus N] [--slots N]
#                              [--secrets DIR | --insecure]
#                              [-- more `ray start` flags, e.g. --node-ip-address 10.0.0.7 --block]
#
# --gpus defaults to every GPU nvidia-smi lists. The node advertises "<role>_gpu" with
# one unit per GPU (or --slots units; one on a node without GPUs), and `pdserve serve`
# places each worker on a node of its role. Credentials as for start-head.sh: the same
# DIR on every node (default /etc/pdserve/secrets), or --insecure on all of them.
set -euo pipefail
# shellcheck source=deploy/ray/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

address="" role="" gpus="" slots="" secrets="" insecure=0
while (($#)); do
  case $1 in
    --address) address=${2:?}; shift 2 ;;
    --role) role=${2:?}; shift 2 ;;
    --gpus) gpus=${2:?}; shift 2 ;;
    --slots) slots=${2:?}; shift 2 ;;
    --secrets) secrets=${2:?}; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    *) die "unknown flag '$1' (put \`ray start\` flags after --)" ;;
  esac
done
[[ -n $address ]] || die "--address HEAD_IP:PORT is required (the head's \`ray start --head\` address)"
[[ -n $role ]] || die "--role prefill|decode is required"

auth_env "$(secrets_dir "$secrets")" "$insecure"
role_args "$role" "$gpus" "$slots"
exec ray start --address "$address" "${ROLE_ARGS[@]}" "$@"
