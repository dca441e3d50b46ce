#!/usr/bin/env bash
# Predict a trained run's test cases three ways and compare them with `augsearch evaluate`:
#   no_tta   plain sliding-window prediction (no policy),
#   flips    the heuristic flips-only TTA (preset flips-tta: identity and one flip per axis, equal weights),
#   learned  the TEA entries of the run's own policy.json (its top K, its weights).
# The test cases are those of the run's config (its data root and split), read from the checkpoint.
# Usage: bash experiments/tta_compare.sh RUN_DIR [OUT_DIR] [more `augsearch predict` options, e.g. --device cuda]
# Writes OUT_DIR/{no_tta,flips,learned}/<case>.nii.gz, OUT_DIR/gt/ (links to the test labels) and
# OUT_DIR/evaluation.csv; OUT_DIR defaults to RUN_DIR/tta_compare.
set -euo pipefail

run=${1:?usage: bash experiments/tta_compare.sh RUN_DIR [OUT_DIR] [augsearch predict options]}
out=${2:-$run/tta_compare}
shift $(($# >= 2 ? 2 : 1))

# Dataset root, file ending and test case ids of the run, one per line.
mapfile -t split < <(python - "$run" <<'PY'
import sys

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.data.dataset import read_dataset_info
from augsearch.data.splits import resolve_splits

cfg = load_checkpoint(sys.argv[1]).experiment_config()
info = read_dataset_info(cfg.data.root)
test = resolve_splits(info, cfg.data.split).test
if not test:
    sys.exit(f"run {sys.argv[1]} has no test cases in its split of {info.root}")
print(info.root.resolve())
print(info.file_ending)
print(*test, sep="\n")
PY
)
root=${split[0]}
ending=${split[1]}
cases=("${split[@]:2}")

rm -rf "$out/gt"
mkdir -p "$out/gt"
for case in "${cases[@]}"; do
    ln -s "$root/labelsTr/$case$ending" "$out/gt/$case$ending"
done

common=(--model "$run" --input "$root/imagesTr" --cases "${cases[@]}")
augsearch predict "${common[@]}" --output "$out/no_tta" "$@"
augsearch predict "${common[@]}" --policy flips-tta --output "$out/flips" "$@"
augsearch predict "${common[@]}" --policy "$run/policy.json" --output "$out/learned" "$@"
augsearch evaluate --pred "$out/no_tta" --pred "$out/flips" --pred "$out/learned" --gt "$out/gt" \
    --labels "$root/dataset.json" --out "$out/evaluation.csv"
