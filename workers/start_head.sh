#!/usr/bin/env bash
# Start the Ray head node of an augsearch cluster on this machine.
#
#   workers/start_head.sh [--gpus N] [--cpus N] [--ip ADDR] [--port PORT] [--no-install]
#
# Installs augsearch into the node's environment first (see install_augsearch in start_worker.sh; --no-install
# uses the active environment as it is), then runs
# `ray start --head`. Prints the address to pass to `augsearch search --address` and to start_worker.sh.
# Defaults: every GPU and CPU of the machine, the machine's primary IP, port 6379. --ip 127.0.0.1 keeps the whole
# cluster on loopback (one machine).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/start_worker.sh" --source-only

gpus="$(detect_gpus)"; cpus="$(nproc)"; ip=""; port=6379; install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --ip) ip="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --port) port="$2"; shift 2 ;;
    *) echo "start_head.sh: unknown option $1 (expected --gpus, --cpus, --ip, --port, --no-install)" >&2; exit 2 ;;
  esac
done
[ -n "$ip" ] || ip="$(primary_ip)"

if [ "$install" = 1 ]; then install_augsearch; fi
case "$ip" in
  # One machine: Ray's loopback-only mode keeps every server and connection on 127.0.0.1 (no worker can join).
  127.*|localhost) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ;;
esac
ray start --head --node-ip-address="$ip" --port="$port" --num-gpus="$gpus" --num-cpus="$cpus" \
  --include-dashboard=false --disable-usage-stats
echo
echo "Ray head is up at $ip:$port with $gpus GPUs and $cpus CPUs."
echo "  add a GPU machine:   workers/start_worker.sh --address $ip:$port"
echo "  run a search:        augsearch search experiments/quickstart.toml --address $ip:$port --out /shared/runs/NAME"
