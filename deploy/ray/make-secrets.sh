#!/usr/bin/env bash
# Write a pdserve cluster's credentials into DIR (mode 700, files 600):
#
#   deploy/ray/make-secrets.sh [--redis] [DIR]     (DIR default: /etc/pdserve/secrets)
#
#   cluster-secret   authenticates worker gRPC and the KV plane (pdserve --cluster-secret-file)
#   ray-auth-token   Ray's token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH)
#   redis-password   with --redis: for the Redis `requirepass` (pdserve --redis-password-file)
#
# Run it once, then copy DIR to the same path on every node (start-head.sh, start-worker.sh
# and launch.sh read it from there). Existing files are kept, never overwritten.
set -euo pipefail
# shellcheck source=deploy/ray/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

redis=0 dir=""
while (($#)); do
  case $1 in
    --redis) redis=1; shift ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) die "unknown flag '$1'" ;;
    *) dir=$1; shift ;;
  esac
done
dir=${dir:-${PDSERVE_SECRETS_DIR:-/etc/pdserve/secrets}}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
names=(cluster-secret ray-auth-token)
((redis == 0)) || names+=(redis-password)
for name in "${names[@]}"; do
  if [[ -e $dir/$name ]]; then
    echo "kept $dir/$name"
  else
    # 32 random bytes as 64 hex characters
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$dir/$name"
    echo "wrote $dir/$name"
  fi
done
