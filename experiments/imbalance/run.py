"""Overfitting under class imbalance: losses x training-set fraction x seeds on the 2D benchmark.

Run from the repository root:

    python experiments/imbalance/run.py --out runs/imbalance --jobs 2

Each (row config, fraction, seed) trains with `augsearch.train.fit` into <out>/<row>/f<pct>/s<seed>/, then predicts the
benchmark's test cases (splits.json) with a sliding window and scores every class with augsearch.metrics (Dice,
sensitivity, precision, HD95 in mm; each a mean over the test cases where it is defined), and writes the logit-shift
diagnostic (train vs test margins: logits.png, logits.json). A finished run leaves result.json and is skipped on a
rerun. The table (mean ± sample std over seeds) goes to <out>/results.md and <out>/results.csv.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROWS = ("ce", "sym_margin", "asym_margin", "sym_focal", "asym_focal", "sym_adversarial", "asym_adversarial",
        "sym_mixup", "asym_mixup", "asym_combination")
# Relative training cost (extra optimiser steps), used to start the longest runs first.
COST = {"adversarial": 2, "mixup": 2, "combination": 3}
FRACTIONS = (0.1, 0.2, 0.5, 1.0)
METRICS = ("dice", "sensitivity", "precision", "hd95")
RARE, FREQUENT = "lesion", "organ"


def run_dir_for(out: Path, row: str, fraction: float, seed: int) -> Path:
    return out / row / f"f{round(fraction * 100):03d}" / f"s{seed}"


def evaluate_test(ckpt, root: Path) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Per test case and class: Dice, sensitivity, precision, HD95 (mm); and their means over cases (NaN ignored)."""
    import torch

    from augsearch.config import SplitConfig
    from augsearch.data.cases import load_cases
    from augsearch.data.dataset import read_dataset_info
    from augsearch.data.splits import resolve_splits
    from augsearch.metrics import dice, hd95, precision, sensitivity
    from augsearch.predict.sliding_window import sliding_window_predict

    info = read_dataset_info(root)
    splits = resolve_splits(info, SplitConfig.model_validate(ckpt.config["data"]["split"]))
    preprocess = ckpt.preprocess
    model = ckpt.build_model()
    rows = []
    for case in load_cases(info, splits.test, preprocess, split=splits.test_split):
        image = torch.from_numpy(case.image).unsqueeze(0)
        pred = sliding_window_predict(model, image, ckpt.patch_size, batch_size=9)[0].argmax(0).numpy()
        for name, value in info.labels.items():
            if value == 0:
                continue
            p, g = pred == value, case.label == value
            rows.append({"case": case.case_id, "class": name, "dice": dice(p, g), "sensitivity": sensitivity(p, g),
                         "precision": precision(p, g), "hd95": hd95(p, g, case.spacing)})
    means = {}
    for name in dict.fromkeys(r["class"] for r in rows):
        means[name] = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in rows if r["class"] == name], dtype=float)
            values = values[~np.isnan(values)]
            means[name][metric] = float(values.mean()) if values.size else math.nan
    return rows, means


def run_one(config: str, fraction: float, seed: int, run_dir: str, overrides: list[str]) -> dict:
    """Train one (config, fraction, seed), evaluate on the test cases, write the logit diagnostic; result dict."""
    import torch

    from augsearch.artifacts.checkpoint import load_checkpoint
    from augsearch.atomic import write_json
    from augsearch.config import load_config
    from augsearch.predict.logit_margins import (
        checkpoint_margins,
        json_ready,
        margin_report,
        plot_margins,
    )
    from augsearch.train import fit

    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    cfg = load_config(config, [*overrides, f"data.split.train_fraction={fraction}", f"seed={seed}"])
    started = time.perf_counter()
    fit(cfg, run_dir, progress=False, overwrite=True)  # an unfinished run starts afresh
    train_s = time.perf_counter() - started
    ckpt = load_checkpoint(run_dir)
    root = Path(cfg.data.root)
    case_rows, test = evaluate_test(ckpt, root)
    margins = checkpoint_margins(ckpt, root, split="test", compare_split="train", max_voxels=20000, seed=0)
    plot_margins(margins["train"], margins["unseen"], run_dir / "logits.png", class_names=margins["class_names"],
                 labels=("train", "test"), title=f"{Path(config).stem}, {round(fraction * 100)}% train, seed {seed}")
    report = margin_report(margins, checkpoint=str(run_dir / "checkpoint.pt"), dataset=str(root))
    write_json(run_dir / "logits.json", report)
    result = {"row": Path(config).stem, "fraction": fraction, "seed": seed, "train_cases": margins["cases"]["train"],
              "test_cases": margins["cases"]["unseen"], "train_s": train_s, "test": test,
              "test_cases_metrics": case_rows,
              "logits": {name: {k: row[k] for k in ("mean_shift", "train_mean", "unseen_mean", "train_frac_across",
                                                    "unseen_frac_across")}
                         for name, row in report["classes"].items()}}
    write_json(run_dir / "result.json", json_ready(result))
    return result


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan, 0
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0, int(finite.size)


def _nan(value) -> float:
    return math.nan if value is None else float(value)


COLUMNS = (  # (column, how to read it from a result)
    ("lesion DSC", lambda r: _nan(r["test"][RARE]["dice"])),
    ("lesion SEN", lambda r: _nan(r["test"][RARE]["sensitivity"])),
    ("lesion PRC", lambda r: _nan(r["test"][RARE]["precision"])),
    ("lesion HD95 mm", lambda r: _nan(r["test"][RARE]["hd95"])),
    ("organ DSC", lambda r: _nan(r["test"][FREQUENT]["dice"])),
    ("lesion margin shift", lambda r: _nan(r["logits"][RARE]["mean_shift"])),
    ("lesion test <0", lambda r: _nan(r["logits"][RARE]["unseen_frac_across"])),
    ("organ margin shift", lambda r: _nan(r["logits"][FREQUENT]["mean_shift"])),
)
PERCENT = {"lesion DSC", "lesion SEN", "lesion PRC", "organ DSC", "lesion test <0"}


def write_tables(out: Path, results: list[dict], rows: list[str], fractions: list[float], seeds: list[int]) -> None:
    from augsearch.atomic import write_text

    by_key: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        by_key.setdefault((r["row"], r["fraction"]), []).append(r)
    csv_buffer = io.StringIO()
    writer = csv.writer(csv_buffer, lineterminator="\n")
    writer.writerow(["row", "train_fraction", "seeds", *(f"{c} {s}" for c, _ in COLUMNS for s in ("mean", "std"))])
    md = [f"Seeds {seeds}; cells: mean ± sample std over seeds (percent for DSC/SEN/PRC and the share of test lesion "
          "voxels with margin < 0; mm for HD95; logits for margin shifts = mean test margin - mean train margin).", ""]
    md.append("| row | train % | n | " + " | ".join(c for c, _ in COLUMNS) + " |")
    md.append("|---|---|---|" + "---|" * len(COLUMNS))
    for fraction in fractions:
        for row in rows:
            group = by_key.get((row, fraction), [])
            if not group:
                continue
            cells, csv_cells = [], []
            for column, read in COLUMNS:
                mean, std, _ = _mean_std([read(r) for r in group])
                scale = 100.0 if column in PERCENT else 1.0
                cells.append("–" if math.isnan(mean) else f"{scale * mean:.1f} ± {scale * std:.1f}" if scale == 100
                             else f"{mean:.2f} ± {std:.2f}")
                csv_cells += [f"{mean:.6g}", f"{std:.6g}"]
            md.append(f"| {row} | {round(fraction * 100)} | {len(group)} | " + " | ".join(cells) + " |")
            writer.writerow([row, fraction, len(group), *csv_cells])
    write_text(out / "results.md", "\n".join(md) + "\n")
    write_text(out / "results.csv", csv_buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/imbalance", help="output folder (default runs/imbalance)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="row configs to run")
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2, help="trainings side by side, one CPU thread each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every row, e.g. --set train.epochs=2")
    args = parser.parse_args(argv)

    from augsearch.config import load_config
    from augsearch.data.synthetic import ensure_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Generate the benchmark once, before the workers start.
    ensure_dataset(load_config(HERE / f"{args.rows[0]}.toml", args.overrides).data)
    tasks, results = [], []
    for row in args.rows:
        for fraction in args.fractions:
            for seed in args.seeds:
                run_dir = run_dir_for(out, row, fraction, seed)
                done = run_dir / "result.json"
                if done.is_file():
                    results.append(json.loads(done.read_text()))
                else:
                    tasks.append((str(HERE / f"{row}.toml"), fraction, seed, str(run_dir), args.overrides))
    tasks.sort(key=lambda t: -max([c for k, c in COST.items() if k in Path(t[0]).stem] or [1]))
    print(f"{len(results)} runs done before, {len(tasks)} to run with {args.jobs} jobs", flush=True)
    started, failures = time.perf_counter(), 0
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, *task): task for task in tasks}
        for future in as_completed(futures):
            config, fraction, seed, run_dir, _ = futures[future]
            try:
                result = future.result()
            except Exception:
                failures += 1
                print(f"FAILED {run_dir}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                continue
            results.append(result)
            lesion = result["test"][RARE]
            elapsed = time.perf_counter() - started
            print(f"[{elapsed:6.0f}s] {result['row']:<17} {round(fraction * 100):3d}% seed {seed}: "
                  f"lesion DSC {_nan(lesion['dice']):.3f} SEN {_nan(lesion['sensitivity']):.3f} "
                  f"PRC {_nan(lesion['precision']):.3f} (train {result['train_s']:.0f}s)", flush=True)
    write_tables(out, results, args.rows, sorted(args.fractions), args.seeds)
    print(f"tables: {out / 'results.md'}, {out / 'results.csv'}; {failures} failed runs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
