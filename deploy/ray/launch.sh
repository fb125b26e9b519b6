#!/usr/bin/env bash
# Start the pdserve router on a Ray cluster (run it on the head node, or any node).
#
#   deploy/ray/launch.sh [--ray-address auto] [--prefill 1] [--decode 1]
#                        [--prefill-tp 1] [--decode-tp 1]
#                        [--prefill-ep 1] [--decode-ep 1] [--kv-transport auto]
#                        [--redis-url redis://HOST:6379/0] [--secrets DIR | --insecure]
#                        [-- more `pdserve serve` flags]
#
# e.g. deploy/ray/launch.sh --prefill 2 --decode 4 --kv-transport ucx -- \
#        --model /models/Llama-3.1-8B-Instruct --host 0.0.0.0 --port 8000
#      deploy/ray/launch.sh --prefill 1 --prefill-tp 4 --decode 2 --decode-tp 2 -- \
#        --model /models/Llama-3.1-70B-Instruct --host 0.0.0.0
#
# Workers go to nodes started with start-head.sh / start-worker.sh --role (or the
# prefill_gpu / decode_gpu node types of cluster.yaml). A worker of TP (or EP) size N is
# one placement group of N GPUs on one node (STRICT_PACK): give its nodes at least N
# GPUs. TP and EP sizes above 1 and a Redis URL are passed on only when given. $PDSERVE
# names the pdserve executable (default: pdserve).
# Authenticated as the nodes are (start-head.sh): the router proves the cluster secret of
# DIR (default /etc/pdserve/secrets) on every worker call and Ray's token to the cluster;
# with DIR/redis-password (make-secrets.sh --redis) it is the Redis password.
set -euo pipefail
# shellcheck source=deploy/ray/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
count() { # count FLAG VALUE MIN
  if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3)); then
    die "$1 must be an integer >= $3, got '$2'"
  fi
}

ray_address=auto prefill=1 decode=1 prefill_ep=1 decode_ep=1 prefill_tp=1 decode_tp=1
transport=auto redis_url=""
secrets="" insecure=0
while (($#)); do
  case $1 in
    --ray-address) ray_address=${2:?}; shift 2 ;;
    --prefill) prefill=${2:?}; shift 2 ;;
    --decode) decode=${2:?}; shift 2 ;;
    --prefill-tp) prefill_tp=${2:?}; shift 2 ;;
    --decode-tp) decode_tp=${2:?}; shift 2 ;;
    --prefill-ep) prefill_ep=${2:?}; shift 2 ;;
    --decode-ep) decode_ep=${2:?}; shift 2 ;;
    --kv-transport) transport=${2:?}; shift 2 ;;
    --redis-url) redis_url=${2:?}; shift 2 ;;
    --secrets) secrets=${2:?}; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown flag '$1' (put \`pdserve serve\` flags after --)" ;;
  esac
done
count --prefill "$prefill" 0
count --decode "$decode" 1
count --prefill-tp "$prefill_tp" 1
count --decode-tp "$decode_tp" 1
count --prefill-ep "$prefill_ep" 1
count --decode-ep "$decode_ep" 1

args=(serve --ray-address "$ray_address" --prefill "$prefill" --decode "$decode")
args+=(--kv-transport "$transport")
((prefill_tp == 1)) || args+=(--prefill-tp "$prefill_tp")
((decode_tp == 1)) || args+=(--decode-tp "$decode_tp")
((prefill_ep == 1)) || args+=(--prefill-ep-size "$prefill_ep")
((decode_ep == 1)) || args+=(--decode-ep-size "$decode_ep")
[[ -z $redis_url ]] || args+=(--redis-url "$redis_url")
dir=$(secrets_dir "$secrets")
auth_env "$dir" "$insecure"
if ((insecure == 0)); then
  args+=(--cluster-secret-file "$dir/cluster-secret")
  if [[ -n $redis_url && -r $dir/redis-password ]]; then
    args+=(--redis-password-file "$dir/redis-password")
  fi
fi
exec "${PDSERVE:-pdserve}" "${args[@]}" "$@"
