#!/usr/bin/env bash
# Start the head node of an on-prem pdserve Ray cluster.
#
#   deploy/ray/start-head.sh [--port 6379] [--role prefill|decode] [--gpus N] [--slots N]
#                            [--secrets DIR | --insecure]
#                            [-- more `ray start` flags, e.g. --node-ip-address 10.0.0.1 --block]
#
# The head hosts no workers by default (--num-cpus 0, no role resource): it runs the
# router (deploy/ray/launch.sh). With --role it also hosts that role's workers, as a
# worker node started by start-worker.sh would (small clusters).
# Authenticated by default: Ray's token and the cluster secret come from DIR (default
# /etc/pdserve/secrets, written by make-secrets.sh); --insecure turns both off (a laptop).
# The dashboard stays on localhost (Ray's default; `ray dashboard` or ssh -L to reach it).
set -euo pipefail
# shellcheck source=deploy/ray/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

port=6379 role="" gpus="" slots="" secrets="" insecure=0
while (($#)); do
  case $1 in
    --port) port=${2:?}; shift 2 ;;
    --role) role=${2:?}; shift 2 ;;
    --gpus) gpus=${2:?}; shift 2 ;;
    --slots) slots=${2:?}; shift 2 ;;
    --secrets) secrets=${2:?}; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown flag '$1' (put \`ray start\` flags after --)" ;;
  esac
done

auth_env "$(secrets_dir "$secrets")" "$insecure"
if [[ -n $role ]]; then
  role_args "$role" "$gpus" "$slots"
else
  ROLE_ARGS=(--num-cpus 0 --num-gpus 0)
fi
exec ray start --head --port "$port" "${ROLE_ARGS[@]}" "$@"
