#!/usr/bin/env bash
# Start the Ray head node of an augsearch cluster on this machine.
#
#   workers/start_head.sh [--gpus N] [--cpus N] [--ip ADDR] [--port PORT] [--dashboard-host ADDR]
#                         [--dashboard-port PORT] [--no-install]
#
# Installs augsearch into the node's environment first (see install_augsearch in start_worker.sh; --no-install
# uses the active environment as it is), makes sure an authentication token exists (~/.ray/auth_token, so that
# `ray start` turns token authentication on), then runs `ray start --head` with the dashboard and its job server.
# Prints the addresses to pass to `augsearch search --address`, `augsearch submit --address` and start_worker.sh.
# Defaults: every GPU and CPU of the machine, the machine's primary IP, port 6379, the job server on
# 127.0.0.1:8265 (reach it from the head or through an SSH tunnel). --ip 127.0.0.1 keeps the whole cluster on
# loopback (one machine). The job server runs any code it is sent: a --dashboard-host other than loopback is
# refused when token authentication is off.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/start_worker.sh" --source-only

gpus="$(detect_gpus)"; cpus="$(nproc)"; ip=""; port=6379; install=1; dashboard_host=127.0.0.1; dashboard_port=8265
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --ip) ip="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --port) port="$2"; shift 2 ;;
    --dashboard-host) dashboard_host="$2"; shift 2 ;;
    --dashboard-port) dashboard_port="$2"; shift 2 ;;
    *) echo "start_head.sh: unknown option $1 (expected --gpus, --cpus, --ip, --port, --dashboard-host," \
            "--dashboard-port, --no-install)" >&2; exit 2 ;;
  esac
done
[ -n "$ip" ] || ip="$(primary_ip)"

if [ "$install" = 1 ]; then install_augsearch; fi
case "$ip" in
  # One machine: Ray's loopback-only mode keeps every server and connection on 127.0.0.1 (no worker can join).
  127.*|localhost) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ;;
esac
case "$dashboard_host" in
  127.*|localhost) ;;
  *) if [ "${RAY_AUTH_MODE:-token}" != token ]; then
       echo "start_head.sh: the job server on $dashboard_host:$dashboard_port runs any code it is sent; with" \
            "RAY_AUTH_MODE=$RAY_AUTH_MODE it would run it for anyone who reaches it. Unset RAY_AUTH_MODE or keep" \
            "--dashboard-host 127.0.0.1" >&2
       exit 2
     fi ;;
esac
# `ray start` turns token authentication on when a token exists; create one (~/.ray/auth_token) if there is none
if [ "${RAY_AUTH_MODE:-token}" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  ray get-auth-token --generate > /dev/null
  chmod 600 "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"  # Ray writes it readable by every user
fi
ray start --head --node-ip-address="$ip" --port="$port" --num-gpus="$gpus" --num-cpus="$cpus" \
  --include-dashboard=true --dashboard-host="$dashboard_host" --dashboard-port="$dashboard_port" --disable-usage-stats
echo
echo "Ray head is up at $ip:$port with $gpus GPUs and $cpus CPUs; job server at http://$dashboard_host:$dashboard_port."
echo "  add a GPU machine:   workers/start_worker.sh --address $ip:$port   (copy ~/.ray/auth_token there first)"
echo "  run a search:        augsearch search experiments/quickstart.toml --address $ip:$port --out /shared/runs/NAME"
echo "  submit a search job: augsearch submit experiments/quickstart.toml --address http://$dashboard_host:$dashboard_port --out /shared/runs"
