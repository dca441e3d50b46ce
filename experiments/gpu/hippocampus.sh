#!/usr/bin/env bash
# MSD Hippocampus table runs (experiments/hippocampus/README.md) on one GPU, many runs at once, for a short lease.
# Usage: bash experiments/gpu/hippocampus.sh SOURCE OUT_DIR MINUTES [SIZE]
#   SOURCE: the 200-case folder (../shared/data/msd_hippocampus_200 or a copy carried with the tree); OUT_DIR gets
#   hippocampus.tgz (the per-run JSON files, logs, curves and policies; no checkpoint, no prediction) and smi.csv (GPU
#   utilisation every 15 s); MINUTES: when to pack, whatever has finished by then. SIZE: training size (default 10).
# Side by side: the RandAugment grid followed by the rows that take its choice (RandAugment, its marginals fixed and
# learned from), the fixed rows and the learned rows, every run
# with one torch thread on `cuda`, into experiments/hippocampus/results_gpu/ and runs/hippocampus_gpu/ (a
# second call on the same machine resumes the runs from their epoch checkpoints; a later lease skips every run whose
# JSON is committed under results_gpu/ and goes on with the rest). Beside the first runs, a smoke pass of three rows
# (shared: a search on its own local Ray) at a few steps into a scratch folder (SKIP_SMOKE=1 skips it): a failure
# there ends the call at once.
# SHARED_WORKERS=N: the workers of row shared (default 2; each takes one of the learned rows' 8 slots). Rows shared
# and shared_retrain need Ray: on a machine without it they are left out, and the log says so.
# ROWS="row ...": run only these rows (JOBS slots, default 16) instead of the three groups, so that fewer runs share
# the GPU and each ends within a lease (a run cut at a lease's end is lost); asking for shared rows without Ray fails.
# SEEDS="k ...": with ROWS, only these seeds (default: the experiment's five), so that fewer runs share the GPU.
# RESULTS=NAME: the per-run JSON files go to experiments/hippocampus/NAME/ (default results_gpu) and the runs to
# runs/hippocampus_gpu_NAME/, so that a variant (SHARED_WORKERS=16, say) is a table of its own, not more seeds of a row.
# Wheels may sit in .whl/, Ray in .ray/ (experiments/gpu/pack.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
source=$1 out=$2 minutes=$3 size=${4:-10}
device=${DEVICE:-cuda}
mkdir -p "$out"
source experiments/gpu/site.sh  # carried wheels and Ray
site=${PYTHONPATH:-}
export PYTHONPATH="$PWD${site:+:$site}" PYTHONUNBUFFERED=1
begin=$(date +%s)
results=experiments/hippocampus/${RESULTS:-results_gpu}
runs=runs/hippocampus_gpu${RESULTS:+_$RESULTS}
run_py="experiments/protocol/run.py experiments/hippocampus"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,name,utilization.gpu,memory.used --format=csv -l 15 > "$out/smi.csv" 2>&1 &
fi
python3 experiments/hippocampus/prepare.py --source "$source" --out runs/data/hippocampus || exit 1
deadline=$(( begin + minutes * 60 ))
common=(--sizes "$size" --out "$runs" --results "$results" --set "train.device=\"$device\"")
mkdir -p "$runs"
learned=(tra_agnostic tra_specific joint retrain shared shared_retrain) smoke=(none joint shared)
if ! python3 -c "import ray" 2> /dev/null; then
    echo "Ray is not installed here: rows shared and shared_retrain are left out"
    learned=(tra_agnostic tra_specific joint retrain) smoke=(none joint)
fi
if [ -n "${ROWS:-}" ]; then  # only these rows, every slot theirs: fewer runs share the GPU, so each ends sooner
    if [[ " $ROWS " == *" shared"* ]] && ! python3 -c "import ray" 2> /dev/null; then
        echo "ROWS asks for shared rows, but Ray is not installed here: carry .ray (experiments/gpu/pack.sh)"
        exit 1
    fi
    python3 $run_py --rows $ROWS ${SEEDS:+--seeds $SEEDS} "${common[@]}" --jobs "${JOBS:-16}" \
        --shared-workers "${SHARED_WORKERS:-2}" \
        > "$runs.rows.log" 2>&1 &
    pids=($!)
else
    ( python3 $run_py --tune-randaugment "${common[@]}" --jobs 4 \
        && python3 $run_py --rows randaugment randaugment_marginals tra_from_randaugment "${common[@]}" --jobs 4 ) \
        > "$runs.grid.log" 2>&1 &
    pids=($!)
    python3 $run_py --rows none nnunet trivialaugment "${common[@]}" --jobs 4 > "$runs.fixed.log" 2>&1 &
    pids+=($!)
    python3 $run_py --rows "${learned[@]}" "${common[@]}" --jobs 8 \
        --shared-workers "${SHARED_WORKERS:-2}" > "$runs.learned.log" 2>&1 &
    pids+=($!)
fi
if [ -z "${SKIP_SMOKE:-}" ]; then  # beside the first runs; a failure ends the call (and its runs) at once
    rm -rf runs/gpu_smoke
    python3 $run_py --rows "${smoke[@]}" --seeds 0 --sizes "$size" --jobs 2 --out runs/gpu_smoke \
        --results runs/gpu_smoke/results --set "train.device=\"$device\"" --set train.epochs=2 \
        --set train.iterations=4 --set augment.warmup_iterations=2 --test-limit 2 --curve-every 1 \
        || { for f in runs/gpu_smoke/logs/*.log; do tail -n 30 "$f"; done; exit 1; }
    echo "smoke passed after $(( $(date +%s) - begin )) s"
fi
alive() { for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && return 0; done; return 1; }
while [ "$(date +%s)" -lt "$deadline" ] && alive; do sleep 5; done
python3 $run_py --aggregate --results "$results" > /dev/null 2>&1
tail -n 5 "$runs".*.log
find "$results" "$runs" \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.md' -o -name '*.log' \) \
    -not -path '*/test_pred/*' -print0 | tar czf "$out/hippocampus.tgz" --null -T - "$runs".*.log
echo "packed after $(( $(date +%s) - begin )) s: $(ls "$results"/train*/*/seed*.json 2>/dev/null | grep -c '/seed[0-9]*\.json$') runs finished"
