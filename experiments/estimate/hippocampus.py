"""Estimated against true Dice on MSD Hippocampus (3D T2 MRI), without and with synthetic shifts, beside moval.

For each seed: train the hippocampus experiment's 3D U-Net with its `nnunet` recipe (experiments/hippocampus/
nnunet.toml, fold 0: 10 training cases) on a shorter budget (BUDGET: 300 segmenter steps instead of 2000), fit every
estimator of augsearch, and moval's counterparts (moval_estimators.py), on the 20 validation cases from plain and
from flips-TTA probabilities (the same TTA at calibration and test), then predict the first TEST_CASES cases of
experiments/hippocampus/test_cases.json as they are ("none") and under synthetic shifts of the preprocessed
(z-scored) volumes (run.synthetic_shift: intensity, noise, blur, resolution, and a ROTATION_DEG rotation, which the
`nnunet` preset never draws: its rotations stay within 30 degrees or are quarter turns), and compare each
estimate with the true Dice of the same prediction, per case and class (Anterior, Posterior).
One JSON file per seed and mode (hippocampus/seed<k>_<mode>.json); finished ones are skipped on a rerun.

    python experiments/hippocampus/prepare.py --out runs/data/hippocampus
    export PYTHONPATH=$PWD OMP_NUM_THREADS=1
    nice -n 10 python experiments/estimate/hippocampus.py --seeds 0 --modes plain     # one process per seed
    nice -n 10 python experiments/estimate/hippocampus.py --seeds 0 --modes tta --test-cases 10 --no-moval
    python experiments/estimate/hippocampus.py --seeds 0 1 --tables-only               # table.md, summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.data.cases import load_cases
from augsearch.data.dataset import read_dataset_info
from augsearch.policy.presets import policy_from_file_or_preset
from augsearch.predict.calibration import validation_probabilities
from augsearch.predict.estimate import ESTIMATORS
from augsearch.predict.tta import predict_tta

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from moval_estimators import MOVAL_ESTIMATORS, fit_moval, moval_parameters  # noqa: E402
from run import case_rows, fit_all, markdown, mean_dice, run_meta, summarise, synthetic_shift  # noqa: E402

REPO = HERE.parents[1]
CONFIG = REPO / "experiments" / "hippocampus" / "nnunet.toml"
BUDGET = ["train.epochs=6", "train.iterations=50", "train.validate_every=6"]  # 300 steps, poly decay over them
CLASSES = {1: "Anterior", 2: "Posterior"}
SHIFTS = ("intensity", "noise", "blur", "resolution", "rotation")
ROTATION_DEG = 45.0
TEST_CASES = 30
MODES = {"plain": None, "tta": "flips-tta"}
RESULTS = HERE / "hippocampus"
MOVAL_PREFIX = "moval "


def train(seed: int, work: Path, data: Path) -> Path:
    """The seed's trained model folder under `work` (trained first when it has no checkpoint)."""
    out = work / f"seed{seed}"
    if not (out / "checkpoint.pt").is_file():
        overrides = [f"seed={seed}", f"data.root={data}", *BUDGET]
        subprocess.run([sys.executable, "-m", "augsearch", "train", str(CONFIG), "--out", str(out), "--quiet",
                        *[arg for o in overrides for arg in ("--set", o)]], check=True)
    return out


def test_sets(data: Path, preprocess) -> dict[str, list[tuple[np.ndarray, np.ndarray, tuple]]]:
    """Condition -> [(image (1, *S), label (*S), spacing)] on the preprocessed grid, first TEST_CASES test cases."""
    ids = json.loads((REPO / "experiments" / "hippocampus" / "test_cases.json").read_text())[:TEST_CASES]
    cases = load_cases(read_dataset_info(data), ids, preprocess, cache_dir=None)
    sets = {"none": [(c.image, c.label, c.spacing) for c in cases]}
    for shift in SHIFTS:
        sets[shift] = []
        for index, case in enumerate(cases):
            image, label = synthetic_shift(case.image, case.label, shift, np.random.default_rng(index), ROTATION_DEG)
            sets[shift].append((image, label, case.spacing))
    return sets


def run_seed(seed: int, mode: str, work: Path, data: Path, results: Path, with_moval: bool) -> dict:
    path = results / f"seed{seed}_{mode}.json"
    if path.is_file():
        return json.loads(path.read_text())
    start, start_cpu = time.time(), time.process_time()
    ckpt = load_checkpoint(train(seed, work, data))
    model = ckpt.build_model()
    policy = None if MODES[mode] is None else policy_from_file_or_preset(MODES[mode], 3, dict(ckpt.label_names))
    _, val_probs, val_labels = validation_probabilities(ckpt, dataset=data, policy=MODES[mode], batch_size=4,
                                                        device="cpu")
    estimators = fit_all(val_probs, val_labels)
    fit_cpu = {}
    if with_moval:
        for name in MOVAL_ESTIMATORS:
            t0 = time.process_time()
            estimators[MOVAL_PREFIX + name] = fit_moval(name, val_probs, val_labels)
            fit_cpu[name] = round(time.process_time() - t0, 1)
            print(f"seed {seed} {mode} moval {name}: {fit_cpu[name]} s CPU", file=sys.stderr, flush=True)
    rows = []
    for condition, cases in test_sets(data, ckpt.preprocess).items():
        for index, (image, label, spacing) in enumerate(cases):
            p = predict_tta(model, image, policy, spacing=spacing, window=ckpt.patch_size, batch_size=4,
                            device="cpu", pad_to_window=True).probabilities.numpy().astype(np.float64)
            rows += case_rows(p, label, estimators, CLASSES, condition=condition, case=index)
        print(f"seed {seed} {mode} {condition}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    result = {
        "seed": seed, "mode": mode, "test_cases": TEST_CASES, "budget": BUDGET, "config": str(CONFIG.relative_to(REPO)),
        "validation_dice": mean_dice(val_probs, val_labels, CLASSES),
        "parameters": {name: est.params for name, est in estimators.items() if name in ESTIMATORS},
        "moval_parameters": {name[len(MOVAL_PREFIX):]: moval_parameters(est) for name, est in estimators.items()
                             if name.startswith(MOVAL_PREFIX)},
        "moval_fit_cpu_seconds": fit_cpu, "wall_seconds": round(time.time() - start, 1),
        "cpu_seconds": round(time.process_time() - start_cpu, 1), "meta": run_meta([seed], start),
        "rows": rounded(rows),
    }
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    return result


def rounded(rows: list[dict]) -> list[dict]:
    """Dice values to 5 decimals (0.001 Dice points): keeps the per-run files small."""
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def comparison(summary: dict, names: list[str]) -> str:
    """Ours / moval MAE side by side for the estimators both have."""
    lines = [f"Ours / moval: MAE (Dice points x 100), {summary['mode']} probabilities.", "",
             "| group/class | n | true Dice | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for key, cell in summary["by_group_class"].items():
        pairs = [f"{cell[n]:.1f} / {cell[MOVAL_PREFIX + n]:.1f}" for n in names]
        lines.append(f"| {key} | {cell['n']} | {cell['true_mean']:.1f} | " + " | ".join(pairs) + " |")
    lines += ["", "| condition (both classes) | true Dice | " + " | ".join(names) + " |",
              "|---" * (len(names) + 2) + "|"]
    for condition, cell in summary["by_condition"].items():
        pairs = [f"{cell[n]:.1f} / {cell[MOVAL_PREFIX + n]:.1f}" for n in names]
        lines.append(f"| {condition} | {cell['true_mean']:.1f} | " + " | ".join(pairs) + " |")
    return "\n".join(lines)


def paired(plain: list[dict], tta: list[dict], groups: dict[str, list[str]]) -> tuple[dict, str]:
    """Plain against TTA MAE of our estimators on the same cases (the first `test_cases` of the TTA runs)."""
    n = min(r["test_cases"] for r in tta)
    seeds = {r["seed"] for r in tta}
    first = [{**r, "rows": [row for row in r["rows"] if row["case"] < n]} for r in plain if r["seed"] in seeds]
    names, classes = list(ESTIMATORS), list(CLASSES.values())
    both = {"plain": summarise(first, names, groups, classes), "tta": summarise(tta, names, groups, classes)}
    title = f"Plain / flips-TTA probabilities on the same cases (first {n} test cases, seeds {sorted(seeds)})"
    lines = [title + ": MAE (Dice points x 100).", "", "| group/class | n | true Dice | " + " | ".join(names) + " |",
             "|---" * (len(names) + 3) + "|"]
    for key, cell in both["plain"]["by_group_class"].items():
        other = both["tta"]["by_group_class"][key]
        pairs = [f"{cell[m]:.1f} / {other[m]:.1f}" for m in names]
        lines.append(f"| {key} | {cell['n']} | {cell['true_mean']:.1f} / {other['true_mean']:.1f} | "
                     + " | ".join(pairs) + " |")
    return both, "\n".join(lines)


def tables(seeds: list[int], results_dir: Path) -> str:
    groups = {"none": ["none"], "shifted": list(SHIFTS)}
    parts, summaries, loaded = [], {}, {}
    for mode in MODES:
        results = [json.loads(p.read_text()) for s in seeds if (p := results_dir / f"seed{s}_{mode}.json").is_file()]
        if not results:
            continue
        loaded[mode] = results
        moval_names = [n for n in MOVAL_ESTIMATORS if MOVAL_PREFIX + n in results[0]["rows"][0]]
        names = list(ESTIMATORS) + [MOVAL_PREFIX + n for n in moval_names]
        summary = {"mode": mode, "seeds": [r["seed"] for r in results], **summarise(results, names, groups,
                                                                                      list(CLASSES.values()))}
        summaries[mode] = summary
        parts.append(markdown(summary, list(ESTIMATORS)))
        if moval_names:
            parts.append(comparison(summary, moval_names))
    if len(loaded) == len(MODES):
        summaries["plain_vs_tta"], text = paired(loaded["plain"], loaded["tta"], groups)
        parts.append(text)
    (results_dir / "summary.json").write_text(json.dumps(summaries, indent=1) + "\n")
    text = "\n\n".join(parts) + "\n"
    (results_dir / "table.md").write_text(text)
    return text


def main() -> None:
    global TEST_CASES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--work", type=Path, default=Path("runs/estimate3d"),
                        help="trained models (default %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("runs/data/hippocampus"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="per-run JSON files and the tables")
    parser.add_argument("--test-cases", type=int, default=TEST_CASES)
    parser.add_argument("--no-moval", action="store_true", help="our estimators only")
    parser.add_argument("--tables-only", action="store_true", help="only rebuild table.md and summary.json")
    args = parser.parse_args()
    TEST_CASES = args.test_cases
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.tables_only:
        for seed in args.seeds:
            for mode in args.modes:
                result = run_seed(seed, mode, args.work.resolve(), args.data.resolve(), args.results,
                                  not args.no_moval)
                print(f"seed {seed} {mode}: {result['wall_seconds']} s wall, {result['cpu_seconds']} s CPU",
                      flush=True)
    print(tables(args.seeds, args.results))


if __name__ == "__main__":
    main()
