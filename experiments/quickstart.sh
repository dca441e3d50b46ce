#!/usr/bin/env bash
# The README's main job on the bundled 2D benchmark, a few minutes on a CPU:
#   1. a joint class-specific TRA + TEA search, two Ray Tune trials (seeds 0 and 1) on an embedded local Ray;
#   2. export of the best trial (by validation rare-class Dice) as policy.json beside checkpoint.pt;
#   3. prediction of the test cases with no TTA, flips-only TTA and the learned TTA, then evaluation of all three.
# Usage: bash experiments/quickstart.sh [OUT_DIR]   (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep the embedded Ray on loopback (127.0.0.1) on machines without a cluster network.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}"
out=${1:-runs/quickstart}

augsearch search experiments/quickstart.toml --out "$out/search"
augsearch export "$out/search" --out "$out/export"
augsearch policy show "$out/export/policy.json"
bash experiments/tta_compare.sh "$out/export" "$out/tta"
