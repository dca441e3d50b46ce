"""Context labels for a heterogeneous background: none / kmeans / dilated / organ / CoLab x seeds.

Run from the repository root (two trainings side by side, one CPU thread each):

    nice -n 10 python experiments/context_labels/run.py --jobs 2                        # the bundled 2D benchmark
    python experiments/hippocampus/prepare.py                                           # MSD Hippocampus data ...
    nice -n 10 python experiments/context_labels/run.py --dataset hippocampus --jobs 2  # ... and its rows

Each (row, seed) trains the dataset's base config (base.toml, hippocampus.toml) with the row's
`loss.context_labels` into <out>/<dataset>/<row>/s<seed>/, predicts the test cases with a sliding window (the merged
K-class output), scores every class with augsearch.metrics (Dice, sensitivity, precision, HD95 in mm; means over the
test cases where defined; the scoring of experiments/imbalance/run.py) and writes the logit diagnostic
(augsearch.predict.logit_margins: train vs test margins per class). A finished run leaves
<results>/<row>_s<seed>.json here (results/ for the 2D benchmark, results_hippocampus/) and is skipped on a rerun;
an unfinished one starts afresh. The table (mean ± sample std over seeds) goes to table.md / table_hippocampus.md.
MSD Hippocampus has no organ label, so its rows are none / kmeans / dilated / colab.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROWS = {  # row -> overrides
    "none": ["loss.context_labels=none"],
    "kmeans": ["loss.context_labels=kmeans", "loss.context_classes=2"],
    "dilated": ["loss.context_labels=dilated"],
    "organ": ["loss.context_labels=organ", 'loss.context_organ_label="organ"'],
    "colab": ["loss.context_labels=colab", "loss.context_classes=2"],
}
COST = {"colab": 3}  # relative training cost, to start the longest runs first


@dataclass(frozen=True)
class Dataset:
    config: str  # base config beside this file
    results: str  # folder of the per-run JSON files beside this file
    table: str
    rows: tuple[str, ...]


DATASETS = {
    "bench2d": Dataset("base.toml", "results", "table.md", tuple(ROWS)),
    "hippocampus": Dataset("hippocampus.toml", "results_hippocampus", "table_hippocampus.md",
                           ("none", "kmeans", "dilated", "colab")),
}


def _imbalance_scoring():
    """experiments/imbalance/run.py's test scoring (one definition for both experiments)."""
    spec = importlib.util.spec_from_file_location("imbalance_run", HERE.parent / "imbalance" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate_test


def run_one(dataset: str, row: str, seed: int, run_dir: str, overrides: list[str]) -> dict:
    """Train one (row, seed), evaluate on the test cases, write the logit diagnostic; the result dict."""
    import torch

    from augsearch.artifacts.checkpoint import load_checkpoint
    from augsearch.atomic import write_json
    from augsearch.config import load_config
    from augsearch.predict.logit_margins import checkpoint_margins, json_ready, margin_report, plot_margins
    from augsearch.train import fit

    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    spec = DATASETS[dataset]
    cfg = load_config(HERE / spec.config, [*ROWS[row], *overrides, f"seed={seed}"])
    started = time.perf_counter()
    fit(cfg, run_dir, progress=False, overwrite=True)
    train_s = time.perf_counter() - started
    ckpt = load_checkpoint(run_dir)
    root = Path(cfg.data.root)
    case_rows, test = _imbalance_scoring()(ckpt, root)
    margins = checkpoint_margins(ckpt, root, split="test", compare_split="train", max_voxels=20000, seed=0)
    plot_margins(margins["train"], margins["unseen"], run_dir / "logits.png", class_names=margins["class_names"],
                 labels=("train", "test"), title=f"context labels: {row}, seed {seed}")
    report = margin_report(margins, checkpoint=str(run_dir / "checkpoint.pt"), dataset=str(root))
    write_json(run_dir / "logits.json", report)
    result = {"row": row, "seed": seed, "overrides": [*ROWS[row], *overrides], "train_s": train_s,
              "total_s": time.perf_counter() - started, "test": test, "test_cases_metrics": case_rows,
              "logits": {name: {k: r[k] for k in ("train_mean", "unseen_mean", "mean_shift", "train_frac_across",
                                                  "unseen_frac_across")}
                         for name, r in report["classes"].items()}}
    write_json(HERE / spec.results / f"{row}_s{seed}.json", json_ready(result))
    return result


def _mean_std(values: list[float]) -> str:
    finite = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return "–"
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return f"{finite.mean():.2f} ± {std:.2f}"


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _test_metric(cls: str, key: str):
    return lambda r: _nan(r["test"][cls][key])


def _wrong_side(cls: str):
    return lambda r: 100 * _nan(r["logits"][cls]["unseen_frac_across"])


def columns(classes: list[str]) -> list[tuple[str, object]]:
    """The table's columns for the foreground classes `classes` (per-class test metrics, then the logit margins)."""
    return [
        *((f"{cls} {m}", _test_metric(cls, key))
          for cls in classes
          for m, key in (("DSC", "dice"), ("SEN", "sensitivity"), ("PRC", "precision"), ("HD95", "hd95"))),
        ("bg margin train", lambda r: _nan(r["logits"]["background"]["train_mean"])),
        ("bg margin test", lambda r: _nan(r["logits"]["background"]["unseen_mean"])),
        ("bg test <0 %", _wrong_side("background")),
        *((f"{cls} test <0 %", _wrong_side(cls)) for cls in classes),
    ]


def write_table(results: list[dict], rows: list[str]) -> str:
    classes = list(dict.fromkeys(cls for r in results for cls in r["test"]))
    cols = columns(classes)
    lines = ["| row | n | " + " | ".join(c for c, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in rows:
        group = [r for r in results if r["row"] == row]
        if group:
            cells = [_mean_std([read(r) for r in group]) for _, read in cols]
            lines.append(f"| {row} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="bench2d", choices=list(DATASETS))
    parser.add_argument("--out", default="runs/context_labels", help="run folders (default runs/context_labels)")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                        help="default: every row the dataset has")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="trainings side by side, one CPU thread each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every row, e.g. --set train.epochs=2")
    args = parser.parse_args(argv)

    from augsearch.atomic import write_text
    from augsearch.config import load_config
    from augsearch.data.synthetic import ensure_dataset

    spec = DATASETS[args.dataset]
    rows = args.rows or list(spec.rows)
    if set(rows) - set(spec.rows):
        parser.error(f"--dataset {args.dataset} has the rows {list(spec.rows)}; {sorted(set(rows) - set(spec.rows))} "
                     "need a label it lacks")
    out = Path(args.out) / args.dataset
    (HERE / spec.results).mkdir(parents=True, exist_ok=True)
    ensure_dataset(load_config(HERE / spec.config, args.overrides).data)  # once, before the workers start
    tasks, results = [], []
    for row in rows:
        for seed in args.seeds:
            done = HERE / spec.results / f"{row}_s{seed}.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
            else:
                tasks.append((args.dataset, row, seed, str(out / row / f"s{seed}"), args.overrides))
    tasks.sort(key=lambda t: -COST.get(t[1], 1))
    print(f"{len(results)} runs done before, {len(tasks)} to run with {args.jobs} jobs", flush=True)
    started, failures = time.perf_counter(), 0
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, *task): task for task in tasks}
        for future in as_completed(futures):
            _, row, seed, _, _ = futures[future]
            try:
                result = future.result()
            except Exception:  # noqa: BLE001 - a failed run is reported and the others go on
                failures += 1
                print(f"FAILED {row} seed {seed}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                continue
            results.append(result)
            scores = ", ".join(f"{cls} DSC {_nan(m['dice']):.3f} SEN {_nan(m['sensitivity']):.3f} "
                               f"PRC {_nan(m['precision']):.3f}" for cls, m in result["test"].items())
            print(f"[{time.perf_counter() - started:6.0f}s] {row:<8} seed {seed}: {scores} "
                  f"(train {result['train_s']:.0f}s)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    header = (f"Seeds {args.seeds}; cells: mean ± sample std over seeds. DSC, SEN, PRC as fractions, HD95 in mm, "
              "margins z_y - max_{c != y} z_c in logits of the merged K-class output (bg: background voxels; "
              "'test <0': share of test voxels of the class on the wrong side of the decision boundary).\n"
              f"This invocation: {len(tasks)} runs in {time.perf_counter() - started:.0f} s wall "
              f"with {args.jobs} jobs; "
              f"machine {platform.machine()} {platform.processor() or ''} {_cpus()}; load average at the end "
              f"{_load()}; commit {commit}.\n\n")
    write_text(HERE / spec.table, header + write_table(results, rows))
    print(f"table: {HERE / spec.table}; {failures} failed runs")
    return 1 if failures else 0


def _cpus() -> str:
    import os

    return f"({os.cpu_count()} CPUs)"


def _load() -> str:
    import os

    return " ".join(f"{v:.1f}" for v in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
