"""Augmentation policies compared (METHOD 8.3 rows) on the bundled 2D benchmark: configs x seeds, test-case metrics.

Run from the repository root (the defaults are the settings of the table in experiments/README.md):

    python experiments/comparison/run.py

Rows run one after another, seed by seed, each on one CPU thread. Each (row, seed) trains with
`augsearch.train.fit` into <out>/<row>/s<seed>/ (row 7 reuses row 2's segmenter when their configs agree apart from
`name`; row 8 starts from row 6's segmenter and policy of the same seed), predicts the benchmark's test cases
(splits.json) with `augsearch.predict.predict_files` (no TTA, the flips-tta preset, or the run's own policy.json) and
scores them with `augsearch.metrics.evaluate_folders`, the code behind `augsearch evaluate` (per-case rows in
<run>/evaluation.csv). A finished run leaves result.json and is skipped on a rerun. The table (per seed: the mean over
test cases; then mean ± sample std over seeds) goes to <results>/results.md and <results>/results.csv.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RARE, FREQUENT = "lesion", "organ"


@dataclass(frozen=True)
class Row:
    name: str  # config file stem and run folder
    title: str  # METHOD 8.3 wording: TRA / TEA
    tta: str | None  # None: plain prediction; a preset name; "own": the run's policy.json
    reuse: str | None = None  # row whose segmenter this row reuses when the configs agree apart from `name`
    posthoc_of: str | None = None  # row whose segmenter and policy this row starts from (frozen segmenter)


ROWS = (
    Row("none", "none / none", None),
    Row("nnunet", "heuristic (nnU-Net-like) / none", None),
    Row("randaugment", "RandAugment N=2 M=2 / none", None),
    Row("trivialaugment", "TrivialAugment / none", None),
    Row("tra_agnostic", "learned class-agnostic / none", None),
    Row("tra_specific", "learned class-specific / none", None),
    Row("nnunet_flips_tta", "heuristic / heuristic (flips)", "flips-tta", reuse="nnunet"),
    Row("tra_specific_tea", "learned class-specific / learned (post hoc)", "own", posthoc_of="tra_specific"),
    Row("joint", "joint learned class-specific / (joint)", "own"),
)
BY_NAME = {row.name: row for row in ROWS}


def run_dir_for(out: Path, row: str, seed: int) -> Path:
    return out / row / f"s{seed}"


def row_overrides(row: Row, seed: int, out: Path, args: argparse.Namespace) -> list[str]:
    """Config overrides of one (row, seed): the seed, the budget flags, and row 8's pointers to row 6's run."""
    overrides = [*args.overrides, f"seed={seed}"]
    if row.posthoc_of is None:
        overrides += [f"train.epochs={args.epochs}", f"train.validate_every={args.epochs}",
                      f"train.checkpoint_every={args.epochs}"] if args.epochs else []
        overrides += [f"train.iterations={args.iterations}"] if args.iterations else []
    else:
        source = run_dir_for(out, row.posthoc_of, seed)
        overrides += [f'train.init_checkpoint="{source / "checkpoint.pt"}"',
                      f'augment.policy="{source / "policy.json"}"']
        overrides += [f"train.iterations={args.posthoc_iterations}"] if args.posthoc_iterations else []
    return overrides


def test_split(cfg) -> tuple[Path, dict[str, int], list[str]]:
    from augsearch.data.dataset import read_dataset_info
    from augsearch.data.splits import resolve_splits

    info = read_dataset_info(cfg.data.root)
    return info.root, dict(info.labels), resolve_splits(info, cfg.data.split).test


def link_ground_truth(root: Path, cases: list[str], gt_dir: Path) -> None:
    """gt_dir/<case>.nii.gz -> the test cases' labels (evaluate_folders matches files by name)."""
    gt_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = gt_dir / f"{case}.nii.gz"
        try:
            link.symlink_to((root / "labelsTr" / f"{case}.nii.gz").resolve())
        except FileExistsError:  # linked earlier, or by a run beside this one
            pass


def evaluate_run(checkpoint: Path, policy: str | None, root: Path, labels: dict[str, int], cases: list[str],
                 run_dir: Path, gt_dir: Path, device: str = "cpu") -> tuple[list[dict], dict]:
    """Predict the test cases into run_dir/test_pred, score them, write run_dir/evaluation.csv; (rows, summary).

    Predictions left by an interrupted call are replaced (predict pads volumes smaller than the window itself)."""
    from augsearch.atomic import write_text
    from augsearch.metrics import evaluate_folders
    from augsearch.predict.files import predict_files

    pred_dir = run_dir / "test_pred"
    predict_files(checkpoint, root / "imagesTr", pred_dir, policy=policy, cases=cases, device=device, progress=False,
                  overwrite=True)
    rows, summary = evaluate_folders(pred_dir, gt_dir, {k: v for k, v in labels.items() if v != 0})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["case", "class"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / "evaluation.csv", buffer.getvalue())
    return rows, summary


def policy_notes(policy_path: Path | None) -> dict:
    """What a learned policy chose: its one-line summary and the TEA entries used at prediction."""
    if policy_path is None or not policy_path.is_file():
        return {}
    from augsearch.policy.io import load_policy

    policy = load_policy(policy_path)
    names = policy.tea_names
    on = 1.0 - policy.tra_probs().detach()[:, :, 0]  # (G, n_ops): P(op applied) per group
    return {"summary": policy.summary(),
            "tea_selected": [[names[i], round(w, 3)] for i, w in policy.tea_selected()],
            "p_on": {group: dict(zip(policy.op_names, map(float, on[g]), strict=True))
                     for g, group in enumerate(policy.group_names)}}


def run_one(row: Row, seed: int, out: Path, args: argparse.Namespace, gt_dir: Path, source: str) -> dict:
    """Train (or reuse) one (row, seed), predict and score the test cases; the result dict (also result.json)."""
    import torch

    from augsearch.atomic import write_json
    from augsearch.config import load_config
    from augsearch.train import fit

    torch.set_num_threads(1)
    run_dir = run_dir_for(out, row.name, seed)
    cfg = load_config(HERE / f"{row.name}.toml", row_overrides(row, seed, out, args))
    root, labels, cases = test_split(cfg)
    checkpoint, policy_path, train_s, val, reused = None, None, 0.0, {}, False
    if row.reuse is not None:
        other = load_config(HERE / f"{row.reuse}.toml", row_overrides(BY_NAME[row.reuse], seed, out, args))
        same = {**other.to_dict(), "name": cfg.name} == cfg.to_dict()
        donor = run_dir_for(out, row.reuse, seed) / "checkpoint.pt"
        if same and donor.is_file():
            checkpoint = donor
            previous = json.loads((run_dir_for(out, row.reuse, seed) / "result.json").read_text())
            train_s, val, reused = previous["train_s"], previous["val"], True
    if checkpoint is None:
        started = time.perf_counter()
        fitted = fit(cfg, run_dir, progress=False, overwrite=True)  # an unfinished run starts afresh
        train_s = time.perf_counter() - started
        checkpoint, policy_path = fitted.checkpoint_path, fitted.policy_path
        val = {k: v for k, v in fitted.metrics.items() if k.startswith("val/")}
    tta = str(policy_path) if row.tta == "own" else row.tta
    started = time.perf_counter()
    case_rows, summary = evaluate_run(checkpoint, tta, root, labels, cases, run_dir, gt_dir)
    lesion_cases = [r for r in case_rows if r["class"] == RARE and not math.isnan(r["sensitivity"])]
    result = {
        "row": row.name, "seed": seed, "source": source, "checkpoint": str(checkpoint), "reused": reused, "tta": tta,
        "train_s": train_s,
        "eval_s": time.perf_counter() - started, "val": val,
        "test": {name: {metric: stats["mean"] for metric, stats in metrics.items()}
                 for name, metrics in summary.items()},
        "lesion_detected": sum(r["dice"] > 0 for r in lesion_cases), "lesion_cases": len(lesion_cases),
        "policy": policy_notes(policy_path) if row.name not in ("none", "nnunet", "randaugment", "trivialaugment")
        else {},
    }
    write_json(run_dir / "result.json", result)
    return result


def source_state() -> str:
    """The commit the numbers come from, and any uncommitted change to the package."""
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "../../augsearch")
    return f"commit {commit}" + (f" with uncommitted changes ({dirty.replace(chr(10), '; ')})" if dirty else "")


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def _nan(value) -> float:
    return math.nan if value is None else float(value)


COLUMNS = (  # (column, how to read it from a result, scale, decimals)
    ("lesion DSC %", lambda r: _nan(r["test"][RARE]["dice"]), 100, 1),
    ("lesion SEN %", lambda r: _nan(r["test"][RARE]["sensitivity"]), 100, 1),
    ("lesion PRC %", lambda r: _nan(r["test"][RARE]["precision"]), 100, 1),
    ("lesion HD95 mm", lambda r: _nan(r["test"][RARE]["hd95"]), 1, 1),
    ("lesions found", lambda r: float(r["lesion_detected"]), 1, 1),
    ("organ DSC %", lambda r: _nan(r["test"][FREQUENT]["dice"]), 100, 1),
    ("val lesion DSC % (plain)", lambda r: _nan(r["val"].get(f"val/dice_{RARE}")), 100, 1),
)


def op_table(results: list[dict]) -> list[str]:
    """Markdown lines: P(op applied) at the end of training per learned TRA row and group, mean ± std over seeds,
    beside the nnU-Net-like start they all share."""
    from augsearch.policy.presets import preset_policy

    columns: dict[str, list[dict[str, float]]] = {}
    for row in ROWS:
        if row.tta == "flips-tta" or row.posthoc_of is not None:
            continue
        for r in sorted((r for r in results if r["row"] == row.name and r["policy"].get("p_on")),
                        key=lambda r: r["seed"]):
            for group, probs in r["policy"]["p_on"].items():
                columns.setdefault(f"{row.name} {group}", []).append(probs)
    if not columns:
        return []
    start = preset_policy("nnunet", 2)
    start_on = dict(zip(start.op_names, map(float, 1.0 - start.tra_probs().detach()[0, :, 0]), strict=True))
    ops = list(next(iter(columns.values()))[0])
    lines = ["", "P(op applied) at the end of training (mean ± std over seeds) in the learned TRA rows, by class "
             "group; every row starts from the nnU-Net-like column:", "",
             "| op | nnU-Net-like start | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for op in ops:
        cells = []
        for values in columns.values():
            mean, std = _mean_std([v[op] for v in values])
            cells.append(f"{mean:.2f} ± {std:.2f}")
        lines.append(f"| {op} | {start_on.get(op, math.nan):.2f} | " + " | ".join(cells) + " |")
    return lines


def write_tables(results_dir: Path, results: list[dict], seeds: list[int], settings: str) -> None:
    from augsearch.atomic import write_text

    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "method_row", "tra_tea", "seeds",
                     *(f"{c} {s}" for c, *_ in COLUMNS for s in ("mean", "std")), "train_s_mean"])
    lesion_cases = max((r["lesion_cases"] for r in results), default=0)
    runtime = sum(r["eval_s"] + (0.0 if r["reused"] else r["train_s"]) for r in results)
    sources: dict[str, list[int]] = {}
    for r in results:
        seeds_of = sources.setdefault(r["source"], [])
        seeds_of += [] if r["seed"] in seeds_of else [r["seed"]]
    source = "; ".join(f"seeds {sorted(s)}: {src}" for src, s in sources.items())
    md = [f"{settings}. Seeds {seeds}. Cells: mean ± sample std over seeds of the per-seed mean over the test cases "
          "(DSC/SEN/PRC/HD95 skip a case where the metric is undefined: HD95 needs a non-empty prediction and "
          "ground truth; a seed without any defined case is left out, '(k seeds)' says how many remain; 'lesions "
          f"found' counts, of the {lesion_cases} test cases with a lesion, those with a lesion DSC above 0). HD95 in "
          "mm (1 mm voxels). 'val lesion DSC' is fit's own validation at the end of training (the 9 validation "
          "cases, predicted without TTA in every row; nothing is selected on it). Training and prediction took "
          f"{runtime / 60:.0f} min in all (one CPU thread, shared machine); {source}.",
          ""]
    md.append("| # | TRA / TEA | config | n | " + " | ".join(c for c, *_ in COLUMNS) + " | train s |")
    md.append("|---|---|---|---|" + "---|" * len(COLUMNS) + "---|")
    for index, row in enumerate(ROWS, start=1):
        group = sorted(by_row.get(row.name, []), key=lambda r: r["seed"])
        if not group:
            continue
        cells, csv_cells = [], []
        for _, read, scale, decimals in COLUMNS:
            values = [read(r) for r in group]
            mean, std = _mean_std(values)
            defined = sum(not math.isnan(v) for v in values)
            partial = f" ({defined} seeds)" if 0 < defined < len(values) else ""
            cells.append("–" if math.isnan(mean)
                         else f"{scale * mean:.{decimals}f} ± {scale * std:.{decimals}f}{partial}")
            csv_cells += [f"{mean:.6g}", f"{std:.6g}"]
        train_s = float(np.mean([r["train_s"] for r in group]))
        md.append(f"| {index} | {row.title} | {row.name}.toml | {len(group)} | " + " | ".join(cells)
                  + f" | {train_s:.0f} |")
        writer.writerow([row.name, index, row.title, len(group), *csv_cells, f"{train_s:.1f}"])
    md += ["", "Per seed, lesion DSC % (test):", "", "| # | config | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---|---|" + "---|" * len(seeds)]
    for index, row in enumerate(ROWS, start=1):
        per_seed = {r["seed"]: r for r in by_row.get(row.name, [])}
        if per_seed:
            cells = [f"{100 * _nan(per_seed[s]['test'][RARE]['dice']):.1f}" if s in per_seed else "–" for s in seeds]
            md.append(f"| {index} | {row.name} | " + " | ".join(cells) + " |")
    md += op_table(results)
    learned = [r for r in results if r["policy"]]
    if learned:
        md += ["", "What the learned policies chose (TRA: the three most probable ops per group, P(op on); TEA: the "
               "entries and weights used at prediction):", ""]
        for r in sorted(learned, key=lambda r: ([row.name for row in ROWS].index(r["row"]), r["seed"])):
            tea = ", ".join(f"{name} {weight:.2f}" for name, weight in r["policy"]["tea_selected"])
            tea_used = f"; TEA used: {tea}" if r["tta"] and r["tta"].endswith(".json") else ""
            md.append(f"- {r['row']} seed {r['seed']}: `{r['policy']['summary']}`{tea_used}")
    write_text(results_dir / "results.md", "\n".join(md) + "\n")
    write_text(results_dir / "results.csv", buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/comparison", help="run folders (default runs/comparison)")
    parser.add_argument("--results", default=str(HERE), help="folder for results.md and results.csv "
                        "(default experiments/comparison)")
    parser.add_argument("--rows", nargs="+", default=[r.name for r in ROWS], choices=[r.name for r in ROWS],
                        help="rows to run (row 7 needs row 2's run, row 8 row 6's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every row that trains a segmenter (default: the configs' 10)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations per epoch of those rows (default: the configs' 25)")
    parser.add_argument("--posthoc-iterations", type=int, default=None,
                        help="iterations per epoch of row 8's post-hoc TEA search (default: the config's 50, 4 epochs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every row, e.g. --set model.base_features=8")
    args = parser.parse_args(argv)

    from augsearch.config import load_config
    from augsearch.data.synthetic import ensure_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = load_config(HERE / f"{args.rows[0]}.toml", args.overrides)
    ensure_dataset(first.data)
    root, _, cases = test_split(first)
    gt_dir = out / "gt"
    link_ground_truth(root, cases, gt_dir)
    rows = [row for row in ROWS if row.name in args.rows]
    train_cfg = load_config(HERE / "nnunet.toml", row_overrides(BY_NAME["nnunet"], 0, out, args)).train
    posthoc = BY_NAME["tra_specific_tea"]
    posthoc_cfg = load_config(HERE / f"{posthoc.name}.toml", row_overrides(posthoc, 0, out, args)).train
    budget = (f"{train_cfg.epochs} epochs x {train_cfg.iterations} iterations per training run, row 8: "
              f"{posthoc_cfg.epochs} x {posthoc_cfg.iterations} TEA iterations"
              + (f", overrides {args.overrides}" if args.overrides else ""))
    source = source_state()  # at the start: the package code the runs import
    results, failures, started = [], 0, time.perf_counter()
    for seed in args.seeds:  # seed-major: an interrupted sweep leaves whole seeds
        for row in rows:
            done = run_dir_for(out, row.name, seed) / "result.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
                continue
            try:
                result = run_one(row, seed, out, args, gt_dir, source)
            except Exception:
                failures += 1
                print(f"FAILED {row.name} seed {seed}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                continue
            results.append(result)
            lesion = result["test"][RARE]
            print(f"[{time.perf_counter() - started:6.0f}s] {row.name:<17} seed {seed}: lesion DSC "
                  f"{_nan(lesion['dice']):.3f} SEN {_nan(lesion['sensitivity']):.3f} PRC "
                  f"{_nan(lesion['precision']):.3f} HD95 {_nan(lesion['hd95']):.1f}, organ DSC "
                  f"{_nan(result['test'][FREQUENT]['dice']):.3f} (train {result['train_s']:.0f}s, "
                  f"eval {result['eval_s']:.0f}s)", flush=True)
            write_tables(Path(args.results), results, args.seeds, budget)
    write_tables(Path(args.results), results, args.seeds, budget)
    print(f"tables: {Path(args.results) / 'results.md'}, {Path(args.results) / 'results.csv'}; "
          f"{failures} failed runs; {time.perf_counter() - started:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
