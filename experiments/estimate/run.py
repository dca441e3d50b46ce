"""Estimated against true Dice on test cases without and with shifts: MAE per estimator and class, several seeds.

For each seed: train a small 2D model on the bundled benchmark (model.toml; `augsearch train`), fit every estimator
on its validation cases (as `augsearch calibrate` does) from plain and from TTA probabilities (preset flips-tta, the
same TTA at calibration and test), then predict the test cases of
- none: the benchmark's own test cases (same distribution as validation),
- planted shifts: the test cases of the benchmark written with --shift (flip_x, rot90_xy, gamma_up, gamma_down),
- synthetic shifts of the unshifted test cases on the preprocessed grid: intensity (x1.5 + 0.5), noise (Gaussian,
  sd 0.5), blur (Gaussian, sigma 1.5 voxels), rotation (30 degrees, labels rotated with them),
and compare each estimator's per-case, per-class estimate with the true Dice of the same prediction.
Finished pieces (checkpoints, per-seed and per-mode results) are kept under --work and skipped on a rerun.
The per-case scoring, the shifts and the tables are shared with hippocampus.py (the same study on 3D MRI).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python experiments/estimate/run.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.transform import resize

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.config import PreprocessConfig, SplitConfig
from augsearch.data.cases import load_cases
from augsearch.data.dataset import read_dataset_info
from augsearch.data.splits import resolve_splits
from augsearch.data.synthetic import SHIFTS, write_benchmark
from augsearch.policy.presets import policy_from_file_or_preset
from augsearch.predict.calibration import validation_probabilities
from augsearch.predict.estimate import ESTIMATORS, fit_estimator
from augsearch.predict.tta import predict_tta

HERE = Path(__file__).resolve().parent
SYNTHETIC = ("intensity", "noise", "blur", "rotation")  # the 2D study; hippocampus.py adds "resolution"
CLASSES = {1: "organ", 2: "lesion"}
MODES = {"plain": None, "tta": "flips-tta"}


def synthetic_shift(image: np.ndarray, label: np.ndarray, shift: str, rng: np.random.Generator,
                    rotation_deg: float = 30.0):
    """A preprocessed case (C, *S) image and (*S) label under a synthetic shift (2D or 3D).

    intensity x1.5 + 0.5, Gaussian noise sd 0.5, Gaussian blur sigma 1.5 voxels, resolution (every axis
    downsampled by 2 with anti-aliasing, then linearly back to the grid), rotation by `rotation_deg` in the plane of
    the first two spatial axes (labels rotated with the image, nearest neighbour).
    """
    if shift == "intensity":
        return image * 1.5 + 0.5, label
    if shift == "noise":
        return image + rng.normal(0, 0.5, image.shape).astype(image.dtype), label
    if shift == "blur":
        return np.stack([ndimage.gaussian_filter(c, 1.5) for c in image]), label
    if shift == "resolution":
        low = [max(1, round(n / 2)) for n in image.shape[1:]]
        return np.stack([resize(resize(c, low, order=1, anti_aliasing=True), c.shape, order=1)
                         for c in image]).astype(image.dtype), label
    if shift == "rotation":
        rotate = {"angle": rotation_deg, "axes": (0, 1), "reshape": False, "mode": "nearest"}
        return np.stack([ndimage.rotate(c, order=1, **rotate) for c in image]), ndimage.rotate(label, order=0, **rotate)
    raise ValueError(shift)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    den = int(pred.sum() + gt.sum())
    return 2.0 * int((pred & gt).sum()) / den if den else math.nan


def test_sets(data: Path, work: Path, preprocess: PreprocessConfig) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Condition -> [(image, label)] on the preprocessed grid."""
    info = read_dataset_info(data)
    test_ids = resolve_splits(info, SplitConfig()).test
    base = [(c.image, c.label) for c in load_cases(info, test_ids, preprocess, cache_dir=None)]
    sets = {"none": base}
    for shift in SHIFTS:
        root = work / f"data_{shift}"
        if not (root / "dataset.json").is_file():
            write_benchmark(root, dims=2, cases=16, train_cases=6, size=64, seed=0, shift=shift)
        shifted = read_dataset_info(root)
        sets[shift] = [(c.image, c.label) for c in load_cases(shifted, test_ids, preprocess, cache_dir=None)]
    rng = np.random.default_rng(0)
    for shift in SYNTHETIC:
        sets[shift] = [synthetic_shift(image, label, shift, rng) for image, label in base]
    return sets


def fit_all(val_probs: list[np.ndarray], val_labels: list[np.ndarray]) -> dict:
    """Every estimator of augsearch fitted on the validation probabilities (K, *S) and labels (*S)."""
    return {name: fit_estimator(name, val_probs, val_labels) for name in ESTIMATORS}


def mean_dice(probs: list[np.ndarray], labels: list[np.ndarray], classes: dict[int, str]) -> dict[str, float]:
    """True Dice of each class of argmax(probs), mean over the cases where it is defined."""
    return {name: float(np.nanmean([dice(p.argmax(0) == v, y == v) for p, y in zip(probs, labels)]))
            for v, name in classes.items()}


def case_rows(p: np.ndarray, label: np.ndarray, estimators: dict, classes: dict[int, str], **keys) -> list[dict]:
    """One row per class: keys, true Dice of argmax(p (K, *S)) against label (*S), and each estimator's estimate.

    estimators: name -> object whose .estimate(p) gives the estimated Dice per class (K,).
    """
    pred = p.argmax(0)
    estimates = {name: est.estimate(p) for name, est in estimators.items()}
    rows = []
    for value, name in classes.items():
        row = {**keys, "class": name, "true": dice(pred == value, label == value)}
        row.update({est_name: float(per_class[value]) for est_name, per_class in estimates.items()})
        rows.append(row)
    return rows


def run_seed(seed: int, mode: str, work: Path, data: Path) -> dict:
    out = work / f"seed{seed}"
    result_path = out / f"result_{mode}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    if not (out / "checkpoint.pt").is_file():
        subprocess.run([sys.executable, "-m", "augsearch", "train", str(HERE / "model.toml"), "--out", str(out),
                        "--quiet", "--set", f"seed={seed}", "--set", f"data.root={data}"], check=True)
    ckpt = load_checkpoint(out)
    model = ckpt.build_model()
    policy = MODES[mode]
    _, val_probs, val_labels = validation_probabilities(ckpt, policy=policy, batch_size=4, device="cpu")
    estimators = fit_all(val_probs, val_labels)
    loaded = None if policy is None else policy_from_file_or_preset(policy, 2, dict(ckpt.label_names))
    preprocess = ckpt.preprocess
    rows = []
    for condition, cases in test_sets(data, work, preprocess).items():
        for index, (image, label) in enumerate(cases):
            probs = predict_tta(model, image, loaded, window=ckpt.patch_size, batch_size=4, device="cpu")
            p = probs.probabilities.numpy().astype(np.float64)
            rows += case_rows(p, label, estimators, CLASSES, condition=condition, case=index)
    result = {"seed": seed, "mode": mode, "validation_dice": mean_dice(val_probs, val_labels, CLASSES), "rows": rows}
    result_path.write_text(json.dumps(result))
    return result


def summarise(results: list[dict], names: list[str], groups: dict[str, list[str]], classes: list[str]) -> dict:
    """MAE (Dice points, x100) per condition group, class and estimator over cases and seeds; NaN rows skipped.

    groups: group name -> its conditions (by_condition lists the conditions in this order).
    """
    table = {}
    for group, conditions in groups.items():
        for cls in classes:
            rows = [r for res in results for r in res["rows"] if r["condition"] in conditions and r["class"] == cls]
            cell = {}
            for name in names:
                errors = [abs(r[name] - r["true"]) for r in rows if not (math.isnan(r["true"]) or math.isnan(r[name]))]
                cell[name] = 100 * float(np.mean(errors)) if errors else math.nan
            cell["n"] = len(rows)
            cell["true_mean"] = 100 * float(np.nanmean([r["true"] for r in rows]))
            table[f"{group}/{cls}"] = cell
    per_condition = {}
    for condition in [c for conditions in groups.values() for c in conditions]:
        rows = [r for res in results for r in res["rows"] if r["condition"] == condition]
        per_condition[condition] = {
            name: 100 * float(np.mean([abs(r[name] - r["true"]) for r in rows
                                      if not (math.isnan(r["true"]) or math.isnan(r[name]))]))
            for name in names
        }
        per_condition[condition]["true_mean"] = 100 * float(np.nanmean([r["true"] for r in rows]))
    return {"by_group_class": table, "by_condition": per_condition}


def markdown(summary: dict, names: list[str]) -> str:
    lines = [f"Mean absolute error of the estimated Dice (Dice points x 100), {summary['mode']} probabilities.", "",
             "| group/class | n | true Dice | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for key, cell in summary["by_group_class"].items():
        best = min(cell[n] for n in names if not math.isnan(cell[n]))
        cells = [(f"**{cell[n]:.1f}**" if cell[n] == best else f"{cell[n]:.1f}") for n in names]
        lines.append(f"| {key} | {cell['n']} | {cell['true_mean']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| condition (both classes) | true Dice | " + " | ".join(names) + " |",
              "|---" * (len(names) + 2) + "|"]
    for condition, cell in summary["by_condition"].items():
        lines.append(f"| {condition} | {cell['true_mean']:.1f} | " + " | ".join(f"{cell[n]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def run_meta(seeds: list[int], start: float) -> dict:
    """Date, commit, machine and load of this run."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            check=False).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch "
                       f"{torch.__version__}, 1 thread", "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()],
            "seeds": seeds, "wall_seconds_unfinished_parts": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("runs/estimate"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    data = (args.work / "data").resolve()
    if not (data / "dataset.json").is_file():
        write_benchmark(data, dims=2, cases=16, train_cases=6, size=64, seed=0)
    start = time.time()
    results = {mode: [run_seed(seed, mode, args.work.resolve(), data) for seed in args.seeds] for mode in MODES}
    names = list(ESTIMATORS)
    groups = {"none": ["none"], "planted": list(SHIFTS), "synthetic": list(SYNTHETIC)}
    summaries = {mode: {"mode": mode, **summarise(results[mode], names, groups, list(CLASSES.values()))}
                 for mode in MODES}
    meta = {**run_meta(args.seeds, start), "validation_dice": [r["validation_dice"] for r in results["plain"]]}
    (HERE / "results.json").write_text(json.dumps({"meta": meta, **summaries}, indent=1) + "\n")
    tables = "\n\n".join(markdown(summaries[mode], names) for mode in MODES)
    (HERE / "table.md").write_text(tables + "\n")
    print(json.dumps(meta))
    print(tables)


if __name__ == "__main__":
    main()
