#!/usr/bin/env bash
# Predict a trained run's test cases three ways and compare them with `augsearch evaluate`:
#   no_tta   plain sliding-window prediction (no policy),
#   flips    the heuristic flips-only TTA (preset flips-tta: identity and one flip per axis, equal weights),
#   learned  the TEA entries of the run's own policy.json (its top K, its weights).
# The test cases are those of the run's config (its data root and split), read from the checkpoint: imagesTs/labelsTs
# when the dataset has them, else the imagesTr cases outside training and validation.
# Usage: bash experiments/tta_compare.sh RUN_DIR [OUT_DIR] [more `augsearch predict` options, e.g. --device cuda]
# Writes OUT_DIR/{no_tta,flips,learned}/<case>.nii.gz, OUT_DIR/gt/ (links to the test labels) and
# OUT_DIR/evaluation.csv; OUT_DIR defaults to RUN_DIR/tta_compare.
set -euo pipefail

run=${1:?usage: bash experiments/tta_compare.sh RUN_DIR [OUT_DIR] [augsearch predict options]}
out=${2:-$run/tta_compare}
shift $(($# >= 2 ? 2 : 1))

# Dataset root, test folder (Tr: imagesTr/labelsTr; Ts: imagesTs/labelsTs), file ending and test case ids of the
# run, one per line.
split=()
mapfile -t split < <(python - "$run" <<'PY'
import sys

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.data.dataset import read_dataset_info
from augsearch.data.splits import resolve_splits

cfg = load_checkpoint(sys.argv[1]).experiment_config()
info = read_dataset_info(cfg.data.root)
splits = resolve_splits(info, cfg.data.split)
if not splits.test:
    sys.exit(f"run {sys.argv[1]} has no test cases in its split of {info.root} ({splits.source}); add imagesTs/ "
             "with labelsTs/, or name test cases in data.split.test")
print(info.root.resolve())
print(splits.test_split)
print(info.file_ending)
print(*splits.test, sep="\n")
PY
)
if ((${#split[@]} < 4)); then
    echo "tta_compare.sh: could not read the test cases of $run (see the error above)" >&2
    exit 1
fi
root=${split[0]}
folder=${split[1]}
ending=${split[2]}
cases=("${split[@]:3}")

rm -rf "$out/gt"
mkdir -p "$out/gt"
for case in "${cases[@]}"; do
    ln -s "$root/labels$folder/$case$ending" "$out/gt/$case$ending"
done

common=(--model "$run" --input "$root/images$folder" --cases "${cases[@]}")
augsearch predict "${common[@]}" --output "$out/no_tta" "$@"
augsearch predict "${common[@]}" --policy flips-tta --output "$out/flips" "$@"
augsearch predict "${common[@]}" --policy "$run/policy.json" --output "$out/learned" "$@"
augsearch evaluate --pred "$out/no_tta" --pred "$out/flips" --pred "$out/learned" --gt "$out/gt" \
    --labels "$root/dataset.json" --out "$out/evaluation.csv"
