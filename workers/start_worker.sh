#!/usr/bin/env bash
# Join this machine to an augsearch Ray cluster as a worker node.
#
#   workers/start_worker.sh --address HEAD_IP:PORT [--gpus N] [--cpus N] [--ip ADDR] [--no-install]
#
# The node's runtime environment: a virtual environment at $AUGSEARCH_VENV (default ~/augsearch-venv) holding the
# same augsearch as the driver, installed from $AUGSEARCH_SRC (a checkout path or a pip requirement, default the
# checkout this script lives in). Trials import augsearch.controller from it, so every node needs the same version.
# Set AUGSEARCH_TORCH to the torch requirement for the node's CUDA (default: torch from the package's range).
set -euo pipefail

AUGSEARCH_VENV="${AUGSEARCH_VENV:-$HOME/augsearch-venv}"
AUGSEARCH_SRC="${AUGSEARCH_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

detect_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --list-gpus | wc -l; else echo 0; fi
}

primary_ip() {
  hostname -I 2>/dev/null | awk '{print $1}'
}

install_augsearch() {
  if [ ! -x "$AUGSEARCH_VENV/bin/python" ]; then
    python3 -m venv "$AUGSEARCH_VENV"
  fi
  # shellcheck disable=SC1091
  source "$AUGSEARCH_VENV/bin/activate"
  python -m pip install -q --upgrade pip
  if [ -n "${AUGSEARCH_TORCH:-}" ]; then python -m pip install -q "$AUGSEARCH_TORCH"; fi
  if [ -d "$AUGSEARCH_SRC" ]; then python -m pip install -q -e "$AUGSEARCH_SRC"; else python -m pip install -q "$AUGSEARCH_SRC"; fi
  python -c "import augsearch, ray; print('augsearch', augsearch.__version__, 'ray', ray.__version__)"
}

if [ "${1:-}" = "--source-only" ]; then return 0 2>/dev/null || exit 0; fi

address=""; gpus="$(detect_gpus)"; cpus="$(nproc)"; ip=""; install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --ip) ip="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    *) echo "start_worker.sh: unknown option $1 (expected --address, --gpus, --cpus, --ip, --no-install)" >&2; exit 2 ;;
  esac
done
if [ -z "$address" ]; then
  echo "start_worker.sh: --address HEAD_IP:PORT is required (start_head.sh prints it)" >&2
  exit 2
fi
[ -n "$ip" ] || ip="$(primary_ip)"

if [ "$install" = 1 ]; then install_augsearch; fi
ray start --address="$address" --node-ip-address="$ip" --num-gpus="$gpus" --num-cpus="$cpus" --disable-usage-stats
echo "worker $ip joined $address with $gpus GPUs and $cpus CPUs; stop it with: ray stop"
