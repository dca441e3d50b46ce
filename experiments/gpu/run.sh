#!/usr/bin/env bash
# Every GPU benchmark and CUDA test in one pass, sized for a short lease (about 5 minutes on an H100/H200):
# the meta-step per backend in 2D, 3D 64^3 and 3D 128^3, augmentation (and, with AUGMENT_BEFORE=DIR holding an
# older augsearch/ package, that version's augmentation in turns with this one), TTA, plain training, the tests
# marked `gpu`, and the served endpoint's load test where Ray Serve is installed (into OUT_DIR/serve/).
# Usage: bash experiments/gpu/run.sh [OUT_DIR]  (default runs/gpu). Results: OUT_DIR/results.json (one entry per
# benchmark) and OUT_DIR/log.txt. Wheels for packages the machine lacks may sit in .whl/, Ray in .ray/
# (experiments/gpu/pack.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/gpu}
parts=$(mktemp -d)
mkdir -p "$out"
log="$out/log.txt"
source experiments/gpu/site.sh  # carried wheels and Ray
site=${PYTHONPATH:-}
export PYTHONPATH="$PWD${site:+:$site}" PYTHONUNBUFFERED=1
{ date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } >> "$log" 2>&1

bench() {  # bench NAME BENCH [ARGS...]: one benchmark into $parts/NAME.json, its output into the log
    local name=$1; shift
    echo "== bench $* ($(date -u +%T))" >> "$log"
    timeout "${BENCH_TIMEOUT:-150}" python3 -m augsearch bench "$@" --device cuda --json "$parts/$name.json" \
        >> "$log" 2>&1
    echo "$name: exit $?" | tee -a "$log"
}
bench meta-3d meta --dims 3 --repeats 10
bench meta-3d-128 meta --dims 3 --patch 128 128 128 --batch-size 2 --repeats 5
bench meta-3d-aniso meta --dims 3 --patch 96 96 32 --batch-size 2 --repeats 5 --backends jvp
bench meta-2d meta --dims 2 --repeats 10
bench tta tta --repeats 5
bench train train --repeats 10
for turn in 1 2 3; do
    bench "augment-after-$turn" augment --repeats 10
    if [ -n "${AUGMENT_BEFORE:-}" ]; then
        PYTHONPATH="$AUGMENT_BEFORE${site:+:$site}" bench "augment-before-$turn" augment --repeats 10
    fi
done
echo "== pytest -m gpu ($(date -u +%T))" >> "$log"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_meta.py tests/test_augment.py \
    tests/test_policy.py tests/test_inference.py tests/test_tta.py tests/test_policy_augmenter.py >> "$log" 2>&1
echo "pytest gpu: exit $?" | tee -a "$log"
# The served endpoint on the GPU: needs Ray Serve and its web stack, which the lent machines have lacked so far.
if python3 -c "import ray.serve, fastapi, uvicorn" 2>/dev/null; then
    echo "== serve load test ($(date -u +%T))" >> "$log"
    mkdir -p "$out/serve"
    timeout "${SERVE_TIMEOUT:-240}" python3 experiments/serve/load_test.py --gpus-per-replica 0.5 --clients 4 \
        --requests 10 --pairs 3 --deadline 120 --work "$parts/serve-load" --out "$out/serve" >> "$log" 2>&1
    echo "serve: exit $?" | tee -a "$log"
else
    echo "serve: skipped (no Ray Serve, fastapi or uvicorn on this machine)" | tee -a "$log"
fi
python3 - "$parts" "$out/results.json" <<'PY'
import json, pathlib, sys
parts = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(parts, indent=1))
PY
