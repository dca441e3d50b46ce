"""The evidence protocol: rows x seeds x training sizes, each run its own process, per-run JSON, paired tables.

An experiment is a folder (experiments/hippocampus/, experiments/bundled/) holding the row configs (<row>.toml, one
per row of ROWS, plus tea_posthoc.toml), test_cases.json and experiment.json (title, foreground labels, the labels
rows are paired on, training size -> data.split.fold of its splits_final.json, default data and run folders, the
command that prepares the data; a variant names another experiment's "configs" folder and its own "overrides"). Run
from the repository root after that command (the experiment's README.md has the protocol):

    python experiments/protocol/run.py experiments/hippocampus --jobs 2        # everything missing, then the tables
    python experiments/protocol/run.py experiments/hippocampus --tune-randaugment --jobs 2   # the RandAugment grid
    python experiments/protocol/run.py experiments/hippocampus --rows none nnunet --seeds 0 1 --sizes 10 --jobs 1
    python experiments/protocol/run.py experiments/hippocampus --aggregate     # tables from the committed JSON files

A run (size, row, seed) trains `fit` into <out>/train<size>/<row>/seed<k>/ (resuming from its last epoch
checkpoint), records the learning curve (curves.py), learns a TEA post hoc on the frozen segmenter where the row has
none of its own, predicts the test cases (test_cases.json) with each TTA column (none, flips, learned) through
`augsearch.predict.files.predict_files`, scores them with `augsearch.metrics.evaluate_folders` and writes
results/train<size>/<row>/seed<k>.json. A run whose JSON exists is skipped. Row `retrain` waits for `joint` of the
same size and seed and trains with its policy.json (joint's and shared's final policies are kept beside the results,
seed<k>.policy.json under their run folder's name, so a retrain runs where their run folders are gone); row
`tra_specific_tea` is row `tra_specific`'s model with its post-hoc TEA (no run of its own). Row `shared` runs the
joint config as an `augsearch search` with one policy shared by --shared-workers workers (default 2) on the embedded
local Ray (worker 0 has the run's seed; the row scores worker 0's segmenter with the shared policy; it occupies that
many cores, or shares the one GPU), and `shared_retrain` trains a fresh segmenter with the final shared policy
fixed; a result of another worker count is set aside (seed<k>_w<N>.json) and run again. Row `tra_from_randaugment`
learns the class-agnostic TRA from the per-op marginals of the tuned RandAugment (preset `randaugment-marginals`),
and row `randaugment_marginals` trains with those marginals fixed (the control that separates learning from drawing
ops independently); like row `randaugment`, a result of another N, M is set aside (seed<k>_n<N>_m<M>.json) and run
again. Rows `shared_from_randaugment` and `shared_from_randaugment_retrain` are rows `shared` and `shared_retrain`
started from those marginals. Rows `shared_chosen_start` and `shared_chosen_start_retrain` have no runs of their own:
per seed they take the shared search (and its retrain) of whichever start, `nnunet` or RandAugment's marginals,
scored the higher validation Dice, as a user running both would; their compute is both. Runs start in the order
sizes, seeds, rows, so one size finishes before the next.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from augsearch.atomic import write_json, write_text
from augsearch.config import load_config
from augsearch.data.dataset import read_dataset_info
from augsearch.metrics import METRICS, summarise
from augsearch.train import fit
from augsearch.tune.search import new_search, resume_search
from augsearch.tune.summary import read_rows

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from curves import CurveRecorder, read_curve, summarise_curve  # noqa: E402 (this folder is not a package)

# experiments/comparison/run.py: ground-truth links, evaluate_run, policy_notes, source_state
_spec = importlib.util.spec_from_file_location("comparison_run", HERE.parent / "comparison" / "run.py")
comparison = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = comparison  # dataclasses look their module up while the file executes
_spec.loader.exec_module(comparison)

TTA = ("none", "flips", "learned")
TUNE_SEED = 100
GRID = [(n, m) for n in (1, 2, 3) for m in (1, 2, 3)]
FIXED = ("none", "nnunet", "randaugment", "trivialaugment")
# fixed rows that isolate one effect for a learned row; not candidates for the best fixed row
CONTROLS = ("randaugment_marginals",)
NOT_LEARNED = FIXED + CONTROLS  # rows whose policy is their start: no learned policy to note or compare across seeds


@dataclass(frozen=True)
class Row:
    name: str
    title: str
    own_tea: bool = False  # the row's policy.json holds the TEA of its "learned" column
    after: str | None = None  # row of the same size and seed whose run must finish first
    config: str | None = None  # another row whose <row>.toml this row trains (default: its own)
    policy_from: str | None = None  # row of the same size and seed whose final policy.json this row trains with
    shared: bool = False  # a shared search (`shared_overrides`) instead of one fit
    policy: str | None = None  # a preset replacing its config's augment.policy ("randaugment-..." takes the tuned N, M)
    # no run of its own: per seed, the run of `choose` whose row in `judge` (default `choose` itself, same order) has
    # the highest validation Dice; its compute is every row of `choose`
    choose: tuple[str, ...] = ()
    judge: tuple[str, ...] = ()

    @property
    def uses_tuned_randaugment(self) -> bool:
        """Trains with the RandAugment grid's N and M (the row itself, or a start at its marginals)."""
        return self.name == "randaugment" or (self.policy or "").startswith("randaugment")


ROWS = (
    Row("none", "none"),
    Row("nnunet", "nnU-Net-like preset"),
    Row("randaugment", "RandAugment"),
    Row("trivialaugment", "TrivialAugment"),
    Row("tra_agnostic", "learned TRA, class-agnostic"),
    Row("tra_specific", "learned TRA, class-specific"),
    Row("tra_specific_tea", "class-specific TRA + learned TEA (post hoc)"),
    Row("joint", "joint class-specific TRA + TEA", own_tea=True),
    Row("retrain", "retrain: fresh segmenter, final joint policy fixed", own_tea=True, after="joint",
        policy_from="joint"),
    Row("shared", "joint, one policy shared by workers", own_tea=True, config="joint", shared=True),
    Row("shared_retrain", "retrain: fresh segmenter, final shared policy fixed", own_tea=True, after="shared",
        config="retrain", policy_from="shared"),
    Row("tra_from_randaugment", "learned TRA, class-agnostic, from tuned RandAugment's marginals",
        config="tra_agnostic", policy="randaugment-marginals"),
    Row("randaugment_marginals", "tuned RandAugment's marginals, ops drawn independently, fixed",
        config="randaugment", policy="randaugment-marginals"),
    Row("shared_from_randaugment", "joint shared by workers, from tuned RandAugment's marginals", own_tea=True,
        config="joint", shared=True, policy="randaugment-marginals"),
    Row("shared_from_randaugment_retrain", "retrain: fresh segmenter, final shared policy from RandAugment's "
        "marginals fixed", own_tea=True, after="shared_from_randaugment", config="retrain",
        policy_from="shared_from_randaugment"),
    Row("shared_chosen_start", "joint shared by workers, start (`nnunet` or RandAugment's marginals) chosen by "
        "validation", own_tea=True, choose=("shared", "shared_from_randaugment")),
    Row("shared_chosen_start_retrain", "retrain: final shared policy of the start chosen by validation fixed",
        own_tea=True, choose=("shared_retrain", "shared_from_randaugment_retrain"),
        judge=("shared", "shared_from_randaugment")),
)
BY_NAME = {row.name: row for row in ROWS}
# rows whose results depend on the worker count: the shared search and those trained with its policy
POLICY_SOURCES = {r.policy_from for r in ROWS if r.policy_from}  # rows whose final policy another row trains with
SHARED_ROWS = tuple(r.name for r in ROWS if r.shared or (r.policy_from and BY_NAME[r.policy_from].shared))
# (row, baseline): paired within the learned family: does the class-specific policy, retraining, pooling over
# workers, learning from RandAugment's operating point pay?
WITHIN = (("tra_specific", "tra_agnostic"), ("retrain", "joint"), ("shared", "joint"), ("shared_retrain", "retrain"),
          ("shared_retrain", "shared"), ("tra_from_randaugment", "randaugment"),
          ("tra_from_randaugment", "randaugment_marginals"), ("tra_from_randaugment", "tra_agnostic"),
          ("randaugment_marginals", "randaugment"), ("shared_from_randaugment", "randaugment_marginals"),
          ("shared_from_randaugment", "tra_from_randaugment"), ("shared_from_randaugment", "shared"),
          ("shared_from_randaugment_retrain", "shared_from_randaugment"),
          ("shared_chosen_start", "shared"), ("shared_chosen_start", "shared_from_randaugment"),
          ("shared_chosen_start", "randaugment"))
DERIVED = {"tra_specific_tea": "tra_specific"}  # row -> row whose run's "learned" column it is
CHOSEN = tuple(r.name for r in ROWS if r.choose)
NOT_RUN = (*DERIVED, *CHOSEN)  # rows made from other rows' runs


@dataclass(frozen=True)
class Experiment:
    """One experiment folder (module docstring); `EXP` is the one this process runs, set once by `main`."""

    dir: Path
    title: str
    labels: tuple[str, ...]  # the foreground labels scored, in table order
    paired: tuple[str, ...]  # the labels whose mean Dice ranks rows and pairs them (the experiment's question)
    sizes: dict[int, int]  # training cases -> data.split.fold of splits_final.json
    data: Path
    out: Path
    prepare: str
    configs: Path  # the folder of the row configs: this one, or another experiment's (a variant: "../bundled")
    overrides: tuple[str, ...]  # config overrides of every run of this experiment (a variant's recipe change)
    workers: int = 2  # workers of row shared (--shared-workers)

    @classmethod
    def load(cls, folder: Path) -> Experiment:
        spec = json.loads((folder / "experiment.json").read_text())
        return cls(dir=folder, title=spec["title"], labels=tuple(spec["labels"]),
                   paired=tuple(spec.get("paired", spec["labels"])),
                   sizes={int(k): int(v) for k, v in spec["sizes"].items()}, data=Path(spec["data"]),
                   out=Path(spec["out"]), prepare=spec["prepare"], configs=folder / spec.get("configs", "."),
                   overrides=tuple(spec.get("overrides", ())))

    def config(self, row: str) -> Path:
        return self.configs / f"{(BY_NAME[row].config or row) if row in BY_NAME else row}.toml"

    def test_cases(self) -> list[str]:
        return json.loads((self.dir / "test_cases.json").read_text())


EXP: Experiment


def use_experiment(folder: Path, workers: int = 2) -> Experiment:
    global EXP
    EXP = dataclasses.replace(Experiment.load(Path(folder)), workers=workers)
    return EXP


def shared_overrides(device: str) -> tuple[str, ...]:
    """Row shared: the joint config as one policy over EXP.workers workers that each train on every training case
    (6 cases do not split into useful shards), one CPU each (an equal share of the CPUs where there are fewer: the
    workers of a shared search must run at once), and an equal share of the GPU when there is one (Ray hides the GPU
    from a trial that asks for none)."""
    gpu = (f"search.gpus_per_trial={1 / EXP.workers}",) if device != "cpu" else ()
    cpus = min(1.0, (os.cpu_count() or 1) / EXP.workers)
    return ("search.policy_sharing=\"shared\"", f"search.num_workers={EXP.workers}", "search.shard=\"all\"",
            f"search.cpus_per_trial={cpus:g}", "search.sync_timeout_s=600", *gpu)


def size_dir(size: int) -> str:
    return f"train{size}"


def result_path(results: Path, size: int, row: str, seed: int) -> Path:
    return results / size_dir(size) / row / f"seed{seed}.json"


def tuned_randaugment(results: Path, size: int) -> tuple[int, int, bool]:
    """(N, M, tuned): the grid's choice for this size, or N 2, M 2 before the grid has run."""
    path = results / size_dir(size) / "randaugment_tuned.json"
    if path.is_file():
        choice = json.loads(path.read_text())["choice"]
        return int(choice["n"]), int(choice["m"]), True
    return 2, 2, False


def run_dir_for(out: Path, size: int, row: str, seed: int, results: Path) -> Path:
    folder = row
    if row in BY_NAME and BY_NAME[row].uses_tuned_randaugment:
        n, m, _ = tuned_randaugment(results, size)
        folder += f"_n{n}_m{m}"
    if row in SHARED_ROWS:
        folder += f"_w{EXP.workers}"
    return out / size_dir(size) / folder / f"seed{seed}"


def kept_policy(results: Path, size: int, row: str, seed: int) -> Path:
    """The committed copy of a run's final policy.json, beside the results, keyed like its run folder (worker count,
    N and M), so that a row trained with it (retrain) runs where the run folder is gone: another machine, a later
    GPU lease."""
    run_dir = run_dir_for(Path(), size, row, seed, results)
    return results / size_dir(size) / run_dir.parent.name / f"seed{seed}.policy.json"


def source_policy(out: Path, size: int, row: str, seed: int, results: Path) -> Path:
    """The final policy.json of `row`'s run: in its run folder, else its kept copy; refused when neither exists."""
    for path in (run_dir_for(out, size, row, seed, results) / "policy.json", kept_policy(results, size, row, seed)):
        if path.is_file():
            return path
    raise SystemExit(f"row {row}, size {size}, seed {seed}: expected its final policy in "
                     f"{run_dir_for(out, size, row, seed, results)} or {kept_policy(results, size, row, seed)}, found "
                     f"neither; run row {row} for this seed first")


def overrides_for(size: int, row: str, seed: int, out: Path, results: Path, extra: list[str] = ()) -> list[str]:
    """The config overrides of one run: seed, fold, data folder, the row's policy preset, RandAugment's N and M,
    retrain's policy, `extra`."""
    spec = BY_NAME.get(row)
    overrides = [*EXP.overrides, *extra, f"seed={seed}", f"data.split.fold={EXP.sizes[size]}"]
    if spec is not None and spec.policy:
        overrides.append(f'augment.policy="{spec.policy}"')
    if spec is not None and spec.uses_tuned_randaugment:
        n, m, _ = tuned_randaugment(results, size)
        overrides += [f"augment.randaugment_n={n}", f"augment.randaugment_m={m}"]
    if spec is not None and spec.policy_from:
        overrides.append(f'augment.policy="{source_policy(out, size, spec.policy_from, seed, results)}"')
    return overrides


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}"


def finished_epochs(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return json.loads(path.read_text().splitlines()[-1])["epoch"] if path.is_file() and path.read_text() else 0


def train(cfg, run_dir: Path, curve_every: int | None) -> float:
    """fit into run_dir unless it finished; resumes from its checkpoint. Wall seconds spent here."""
    if finished_epochs(run_dir) >= cfg.train.epochs:
        return 0.0
    started = time.perf_counter()
    checkpoint = run_dir / "checkpoint.pt"
    callbacks = [CurveRecorder(cfg, run_dir, curve_every)] if curve_every else []
    fit(cfg, run_dir, callbacks=callbacks, resume=checkpoint if checkpoint.is_file() else None, progress=True)
    return time.perf_counter() - started


def train_shared(cfg, run_dir: Path) -> tuple[float, list[dict]]:
    """The shared search into run_dir/search on the embedded local Ray (resumed when interrupted); copies worker 0's
    checkpoint, policy and metrics into run_dir. Returns the wall seconds spent here and every worker's totals."""
    search_dir = run_dir / "search"
    started, wall = time.perf_counter(), 0.0
    done = (run_dir / "metrics.jsonl").is_file()
    if not done:
        if (search_dir / "tuner.pkl").is_file():
            result = resume_search(search_dir)
        else:  # never started, or stopped before Ray Tune wrote its state: start afresh
            shutil.rmtree(search_dir, ignore_errors=True)
            result = new_search(cfg, search_dir)
        if result.interrupted or result.failed or len(result.rows) != cfg.search.num_workers:
            raise RuntimeError(f"shared search {search_dir} did not finish: {[r['status'] for r in result.rows]}")
        wall = time.perf_counter() - started
    workers = sorted(read_rows(search_dir), key=lambda r: r["params"]["search.worker"])
    fits = [search_dir / w["trial"] / "fit" for w in workers]
    if not done:
        for name in ("checkpoint.pt", "policy.json", "config.json", "metrics.jsonl"):  # metrics.jsonl last: marker
            shutil.copy2(fits[0] / name, run_dir / f".{name}.part")
            os.replace(run_dir / f".{name}.part", run_dir / name)
    return wall, [{"worker": w["params"]["search.worker"], **epoch_totals(f)} for w, f in zip(workers, fits)]


def add_wall(run_dir: Path, phase: str, seconds: float) -> dict:
    """Add `seconds` to `phase` in run_dir/wall.json (summed over the invocations that resumed the run); all phases."""
    path = run_dir / "wall.json"
    wall = json.loads(path.read_text()) if path.is_file() else {}
    if seconds > 0:  # a phase found finished adds nothing
        wall[phase] = wall.get(phase, 0.0) + seconds
        write_json(path, wall)
    return wall


def scored(run_dir: Path, n_rows: int) -> list[dict] | None:
    """The per-case rows of a TTA column scored by an earlier invocation (all `n_rows` of them), else None."""
    path = run_dir / "evaluation.csv"
    if not path.is_file():
        return None
    rows = [{k: v if k in ("case", "class") else float(v or "nan") for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(path.read_text()))]
    complete = len(rows) == n_rows and set(METRICS) <= set(rows[0])  # a file from before a metric was added: redo
    return rows if complete else None


def epoch_totals(run_dir: Path) -> dict:
    """Steps, meta-steps, TEA steps and the summed epoch times (training alone, no validation) from fit's
    metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"steps": int(lines[-1]["step"]), "meta_steps": int(lines[-1].get("meta/steps", 0)),
            "tea_steps": int(lines[-1].get("tea/steps", 0)),
            "epoch_s": float(sum(line["time/epoch_s"] for line in lines)),
            "val": {k: v for k, v in lines[-1].items() if k.startswith("val/")}}


def finite(value):
    """NaN and infinities -> None, so the JSON files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def run_one(size: int, row_name: str, seed: int, out: Path, results: Path, curve_every: int,
            extra: list[str] = (), test_limit: int | None = None) -> dict:
    """Train, post-hoc TEA, predict and score one (size, row, seed); write and return its result JSON."""
    torch.set_num_threads(1)
    row = BY_NAME[row_name]
    source = comparison.source_state()
    run_dir = run_dir_for(out, size, row.name, seed, results)
    overrides = overrides_for(size, row.name, seed, out, results, extra)
    cfg = load_config(EXP.config(row.name), overrides)
    workers = []
    if row.shared:  # the search's settings depend on the device the row's config trains on
        overrides += shared_overrides(cfg.train.device)
        cfg = load_config(EXP.config(row.name), overrides)
        run_dir.mkdir(parents=True, exist_ok=True)
        seconds, workers = train_shared(cfg, run_dir)
    else:
        seconds = train(cfg, run_dir, curve_every)
    add_wall(run_dir, "train", seconds)
    totals = epoch_totals(run_dir)
    tea_totals = {"steps": 0, "epoch_s": 0.0}
    if row.own_tea:
        learned_policy = Path(cfg.augment.policy) if row.policy_from else run_dir / "policy.json"
    else:  # a TEA learned post hoc on the frozen segmenter, from the same identity-and-flips start in every row
        tea_dir = run_dir / "tea_posthoc"
        start = run_dir / "policy.json"
        tea_cfg = load_config(EXP.config("tea_posthoc"), [
            *overrides_for(size, "tea_posthoc", seed, out, results, extra),
            f'train.init_checkpoint="{run_dir / "checkpoint.pt"}"',
            f'augment.policy="{start if start.is_file() else "nnunet"}"'])
        add_wall(run_dir, "posthoc_tea", train(tea_cfg, tea_dir, None))
        tea_totals = epoch_totals(tea_dir)
        learned_policy = tea_dir / "policy.json"
    info = read_dataset_info(cfg.data.root)
    test_cases = EXP.test_cases()[:test_limit]
    gt_dir = out / "gt"
    comparison.link_ground_truth(info.root, test_cases, gt_dir)
    test = {}
    for column, policy in zip(TTA, (None, "flips-tta", str(learned_policy)), strict=True):
        column_dir = run_dir / f"tta_{column}"
        rows = scored(column_dir, len(test_cases) * len(EXP.labels))
        if rows is None:  # predict and score; a column scored before an interruption is read back instead
            started = time.perf_counter()
            rows, _ = comparison.evaluate_run(run_dir / "checkpoint.pt", policy, info.root, dict(info.labels),
                                              test_cases, column_dir, gt_dir, device=cfg.train.device)
            add_wall(run_dir, "eval", time.perf_counter() - started)
        summary = summarise(rows)
        test[column] = {name: {metric: stats["mean"] for metric, stats in metrics.items()}
                        | {"hd95_defined": metrics["hd95"]["n"]} for name, metrics in summary.items()}
    curve = read_curve(run_dir)
    curve = list({line["epoch"]: line for line in curve}.values())  # a resumed run may repeat an epoch
    n, m, tuned = tuned_randaugment(results, size)
    result = {
        "size": size, "row": row.name, "seed": seed, "source": source, "machine": machine(),
        "config": str(EXP.config(row.name)), "overrides": overrides,
        "randaugment": {"n": n, "m": m, "tuned": tuned} if row.uses_tuned_randaugment else None,
        "shared_workers": EXP.workers if row.name in SHARED_ROWS else None,
        "segmenter_steps": totals["steps"], "meta_steps": totals["meta_steps"],
        "tea_steps": totals["tea_steps"] if row.own_tea and not row.policy_from else tea_totals["steps"],
        "train_epoch_s": sum(w["epoch_s"] for w in workers) if workers else totals["epoch_s"],
        "tea_epoch_s": tea_totals["epoch_s"],
        "workers": [{k: v for k, v in w.items() if k != "val"} | {"val_dice": val_dice(w)} for w in workers],
        "wall_s": add_wall(run_dir, "", 0.0), "val": totals["val"],
        "curve_summary": summarise_curve(curve, list(EXP.paired)),
        "curve": [{k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()} for line in curve],
        "test": test, "test_cases": len(test_cases),
        "policy": comparison.policy_notes(learned_policy if row.name not in NOT_LEARNED else None),
        "posthoc_tea": comparison.policy_notes(learned_policy) if not row.own_tea else {},
    }
    if row.name in POLICY_SOURCES:  # a later row trains with this policy, maybe on another machine
        kept = kept_policy(results, size, row.name, seed)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "policy.json", kept.with_suffix(".tmp"))
        kept.with_suffix(".tmp").replace(kept)
    write_json(result_path(results, size, row.name, seed), finite(result))
    return result


# ---------------------------------------------------------------------------------------------------------------
# RandAugment grid (validation only)


def tune_one(size: int, n: int, m: int, out: Path, results: Path, extra: list[str] = ()) -> dict:
    """One grid cell: train with (N, M) at the tuning seed; fit's final validation only, no test case is read."""
    torch.set_num_threads(1)
    run_dir = out / "tune" / size_dir(size) / f"randaugment_n{n}_m{m}" / f"seed{TUNE_SEED}"
    overrides = [*EXP.overrides, *extra, f"seed={TUNE_SEED}", f"data.split.fold={EXP.sizes[size]}",
                 f"augment.randaugment_n={n}",
                 f"augment.randaugment_m={m}"]
    cfg = load_config(EXP.config("randaugment"), overrides)
    wall = add_wall(run_dir, "train", train(cfg, run_dir, None)).get("train", 0.0)
    totals = epoch_totals(run_dir)
    result = {"size": size, "n": n, "m": m, "seed": TUNE_SEED, "wall_s": wall, "train_epoch_s": totals["epoch_s"],
              "val": totals["val"],
              "val_dice_mean": val_dice(totals),
              "source": comparison.source_state(), "machine": machine()}
    write_json(grid_path(results, size, n, m), result)
    return result


def grid_path(results: Path, size: int, n: int, m: int) -> Path:
    return results / size_dir(size) / "randaugment_grid" / f"n{n}_m{m}.json"


def choose_randaugment(results: Path, size: int) -> None:
    """When every grid cell of `size` has run: the best validation Dice -> randaugment_tuned.json."""
    cells = [grid_path(results, size, n, m) for n, m in GRID]
    if not all(p.is_file() for p in cells):
        return
    grid = [json.loads(p.read_text()) for p in cells]
    best = max(grid, key=lambda g: g["val_dice_mean"])
    recipe = load_config(EXP.config("randaugment"), list(EXP.overrides)).train
    steps = recipe.epochs * recipe.iterations
    write_json(results / size_dir(size) / "randaugment_tuned.json", {
        "choice": {"n": best["n"], "m": best["m"]}, "criterion": f"highest mean validation Dice "
        f"({', '.join(EXP.paired)}), tuning seed {TUNE_SEED}, {steps} steps per cell",
        "grid": [{"n": g["n"], "m": g["m"], "val_dice_mean": g["val_dice_mean"], "wall_s": g["wall_s"]}
                 for g in grid],
        "tuning_cpu_s": float(sum(g["train_epoch_s"] for g in grid))})


# ---------------------------------------------------------------------------------------------------------------
# Tables


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def bootstrap_ci(differences: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-seed differences (resampling seeds)."""
    values = np.asarray(differences, dtype=float)
    if values.size < 2:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def shared_workers(result: dict) -> int:
    """The worker count of a shared row's result (files from before the count was recorded: 2)."""
    return int(result.get("shared_workers") or 2)


def load_results(results: Path) -> list[dict]:
    """Every run's JSON, plus the rows made from them: tra_specific_tea (tra_specific's learned column) and the
    rows chosen by validation (`chosen`), for the sizes and seeds where every row they choose among has run."""
    found = []
    for path in sorted(results.glob("train*/*/seed*.json")):
        if re.fullmatch(r"seed\d+\.json", path.name) and path.parent.name in BY_NAME:
            found.append(json.loads(path.read_text()))
    for derived, base in DERIVED.items():
        for r in [r for r in found if r["row"] == base]:
            found.append({**r, "row": derived, "derived_from": base})
    return found + chosen(found)


def chosen(runs: list[dict]) -> list[dict]:
    """For each CHOSEN row, size and seed: the run of its `choose` rows whose `judge` row scores the highest
    validation Dice (the first on a tie), renamed to the chosen row, with `chosen_from` naming its row and
    `train_epoch_s` summed over every run the choice needed (its compute)."""
    by_key = {(r["size"], r["row"], r["seed"]): r for r in runs}
    made = []
    for row in (BY_NAME[name] for name in CHOSEN):
        judges = row.judge or row.choose
        for size, seed in sorted({(r["size"], r["seed"]) for r in runs}):
            candidates = [by_key.get((size, name, seed)) for name in row.choose]
            verdicts = [by_key.get((size, name, seed)) for name in judges]
            if None in candidates or None in verdicts:
                continue
            best = max(range(len(judges)), key=lambda i: (val_dice(verdicts[i]), -i))
            needed = {id(r): r for r in candidates + verdicts}.values()
            made.append({**candidates[best], "row": row.name, "chosen_from": row.choose[best],
                         "train_epoch_s": sum(r["train_epoch_s"] for r in needed)})
    return made


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def mean_dice(r: dict, column: str) -> float:
    """Test Dice of one run and TTA column, averaged over the experiment's paired labels."""
    return float(np.mean([_nan(r["test"][column][k]["dice"]) for k in EXP.paired]))


def val_dice(r: dict) -> float:
    """fit's final validation Dice, averaged over the experiment's paired labels."""
    return float(np.mean([r["val"][f"val/dice_{k}"] for k in EXP.paired]))


def train_seconds(group: list[dict], tag: dict[str, str]) -> str:
    """The `train s` cell: mean summed epoch time of a row's runs, per machine where the table has several."""
    by_machine: dict[str, list[float]] = {}
    for r in group:
        by_machine.setdefault(tag.get(r["machine"], ""), []).append(r["train_epoch_s"])
    if not tag:
        return f"{np.mean(by_machine['']):.0f}"
    return ", ".join(f"{np.mean(times):.0f} ({name})" for name, times in sorted(by_machine.items()))


def paired_line(label: str, diffs: list[float]) -> str:
    low, high = bootstrap_ci(diffs)
    return (f"| {label} | {len(diffs)} | {np.mean(diffs):+.1f} | [{low:+.1f}, {high:+.1f}] | "
            f"{sum(d > 0 for d in diffs)}/{len(diffs)} |")


def policy_spread(group: list[dict]) -> float:
    """Mean over ops and groups of the std over seeds of the learned P(op applied): how far the seeds' policies
    disagree (a policy that every seed learns alike scores 0)."""
    notes = [r["policy"]["p_on"] for r in group if r.get("policy") and r["policy"].get("p_on")]
    if len(notes) < 2:
        return math.nan
    keys = [(g, op) for g in notes[0] for op in notes[0][g]]
    return float(np.mean([np.std([n[g][op] for n in notes], ddof=1) for g, op in keys]))


def within_family(by_row: dict[str, list[dict]]) -> list[str]:
    """Paired differences inside the learned family (WITHIN) and the seeds' disagreement on the learned policy; each
    part only where it has runs."""
    lines = []
    for row, baseline in WITHIN:
        base = {r["seed"]: mean_dice(r, "none") for r in by_row[baseline]}
        diffs = [100 * (mean_dice(r, "none") - base[r["seed"]]) for r in by_row[row] if r["seed"] in base]
        if diffs:
            lines.append(paired_line(f"{row} - {baseline}", diffs))
    md = ["", "Inside the learned family, and against the fixed policy a learned row starts from: paired per-seed "
          "differences in mean Dice without TTA (percentage points), 95% bootstrap interval, wins:", "",
          "| row - baseline | seeds | difference | 95% interval | wins |",
          "|---|---|---|---|---|", *lines] if lines else []
    spread = {row.name: policy_spread(by_row[row.name]) for row in ROWS
              if row.name not in NOT_LEARNED and row.name not in NOT_RUN and not row.policy_from}
    spread = {name: value for name, value in spread.items() if not math.isnan(value)}
    if spread:
        md += ["", "Disagreement of the seeds' learned TRA policies (mean over ops and groups of the std over seeds of "
               "P(op applied); 0 when every seed learns the same policy): "
               + ", ".join(f"{name} {value:.3f} ({len(by_row[name])} seeds)" for name, value in spread.items()) + "."]
    return md


def write_tables(results: Path) -> None:
    runs = load_results(results)
    long = io.StringIO()
    writer = csv.writer(long, lineterminator="\n")
    writer.writerow(["size", "row", "seed", "tta", "class", "metric", "value"])
    for r in sorted(runs, key=lambda r: (r["size"], [x.name for x in ROWS].index(r["row"]), r["seed"])):
        for column in TTA:
            for name in EXP.labels:
                for metric in ("dice", "hd95", "sensitivity", "precision"):
                    writer.writerow([r["size"], r["row"], r["seed"], column, name, metric,
                                     f"{_nan(r['test'][column][name][metric]):.6g}"])
    md = [f"# {EXP.title} results", "",
          f"Written by `python experiments/protocol/run.py {Path(os.path.relpath(EXP.dir)).as_posix()}` from the "
          "per-run JSON files beside "
          "this file (protocol in the experiment's README.md). Cells: mean ± sample std over seeds of the per-seed "
          f"mean over the {len(EXP.test_cases())} test cases; Dice, sensitivity, precision in %, HD95 in mm (a case "
          "without a defined HD95 is left out). n: seeds.", ""]
    # a table whose runs come from several machines names them M1, M2, ...: times differ by machine, Dice does not
    machines = sorted({r["machine"] for r in runs})
    tag = {m: f"M{i}" for i, m in enumerate(machines, start=1)} if len(machines) > 1 else {}
    for size in EXP.sizes:
        sized = [r for r in runs if r["size"] == size]
        if not sized:
            continue
        by_row = {row.name: sorted([r for r in sized if r["row"] == row.name], key=lambda r: r["seed"])
                  for row in ROWS}
        md += [f"## {size} training cases", "", "Without TTA (row 7: its learned TTA, the rest of it is row 6):", "",
               "| # | row | n | " + " | ".join(f"{k} {m}" for k in EXP.labels for m in ("Dice", "HD95", "SEN", "PRC"))
               + " | val Dice | train s | meta-steps | TEA steps |", "|---|---|---|" + "---|" * 12]
        for index, row in enumerate(ROWS, start=1):
            group = by_row[row.name]
            if not group:
                continue
            cells = []
            for name in EXP.labels:
                for metric, scale in (("dice", 100), ("hd95", 1), ("sensitivity", 100), ("precision", 100)):
                    column = "learned" if row.name in DERIVED else "none"
                    mean, std = mean_std([_nan(r["test"][column][name][metric]) for r in group])
                    cells.append(f"{scale * mean:.1f} ± {scale * std:.1f}")
            val, _ = mean_std([val_dice(r) for r in group])
            title = row.title
            if row.uses_tuned_randaugment:
                settings = sorted({(r["randaugment"]["n"], r["randaugment"]["m"], r["randaugment"]["tuned"])
                                   for r in group})
                title += " " + ", ".join(f"N {n} M {m} ({'tuned' if t else 'untuned'})" for n, m, t in settings)
            if row.name in SHARED_ROWS:
                title += " (" + ", ".join(str(w) for w in sorted({shared_workers(r) for r in group})) + ")"
            md.append(f"| {index} | {title} | {len(group)} | " + " | ".join(cells)
                      + f" | {100 * val:.1f} | {train_seconds(group, tag)} | "
                      f"{group[0]['meta_steps']} | {group[0]['tea_steps']} |")
        md += ["", f"Mean Dice over {' and '.join(EXP.paired)} (%) by TTA column:", "",
               "| # | row | n | " + " | ".join(TTA) + " |", "|---|---|---|" + "---|" * len(TTA)]
        for index, row in enumerate(ROWS, start=1):
            group = by_row[row.name]
            if group:
                cells = []
                for column in TTA:
                    mean, std = mean_std([mean_dice(r, column) for r in group])
                    cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
                md.append(f"| {index} | {row.title} | {len(group)} | " + " | ".join(cells) + " |")
        fixed = {name: mean_std([val_dice(r) for r in by_row[name]])[0]
                 for name in FIXED if by_row[name]}
        if fixed:
            best = max(fixed, key=lambda name: fixed[name])
            base = {r["seed"]: mean_dice(r, "none") for r in by_row[best]}
            md += ["", f"Paired per-seed differences in mean Dice (percentage points) to the best fixed row by "
                   f"validation Dice, **{best}** without TTA (validation Dice of rows 1-4: "
                   + ", ".join(f"{k} {100 * v:.1f}" for k, v in fixed.items()) + "); 95% bootstrap interval over "
                   "seeds; wins = seeds where the row is higher:", "",
                   "| row | TTA | seeds | difference | 95% interval | wins |", "|---|---|---|---|---|---|"]
            for row in ROWS:
                if (row.name in FIXED and row.name != best) or not by_row[row.name]:
                    continue
                for column in ("learned",) if row.name in DERIVED else TTA:
                    pairs = [(mean_dice(r, column), base[r["seed"]]) for r in by_row[row.name] if r["seed"] in base]
                    if (row.name == best and column == "none") or not pairs:
                        continue
                    md.append(paired_line(f"{row.name} | {column}", [100 * (a - b) for a, b in pairs]))
        md += within_family(by_row)
        md += ["", "Per seed, mean Dice without TTA (%), and the time of each run in minutes (training wall time "
               "with its curve points and validation; post-hoc TEA as summed epoch time; test prediction and "
               "scoring of the three TTA columns):", "",
               "| row | seed | " + ("machine | " if tag else "") + "Dice | val Dice | train min | TEA min | eval min | "
               "overfitting (val loss rise; train-val Dice gap) |", "|---|---|---|---|---|---|---|---|"
               + ("---|" if tag else "")]
        for row in ROWS:
            for r in by_row[row.name]:
                if row.name in NOT_RUN:
                    continue
                wall, curve = r["wall_s"], r["curve_summary"]
                md.append(f"| {row.name} | {r['seed']} | " + (f"{tag[r['machine']]} | " if tag else "")
                          + f"{100 * mean_dice(r, 'none'):.1f} | "
                          f"{100 * val_dice(r):.1f} | "
                          f"{wall.get('train', math.nan) / 60:.0f} | {r.get('tea_epoch_s', 0) / 60:.0f} | "
                          f"{wall.get('eval', math.nan) / 60:.0f} | "
                          + (f"{curve['val_loss_rise']:+.3f} from epoch {curve['best_val_loss_epoch']}; "
                             f"{curve['final_gap_dice']:+.3f}" if curve else "–") + " |")
        for name in CHOSEN:
            if by_row[name]:
                md += ["", f"{name} chose (its compute is every row it chooses among): "
                       + ", ".join(f"seed {r['seed']} {r['chosen_from']}" for r in by_row[name]) + "."]
        md.append("")
    sources = sorted({r["source"] for r in runs})
    named = [f"{tag[m]} = {m}" for m in machines] if tag else machines
    md += [f"Sources: {'; '.join(sources)}. Machines: {'; '.join(named)}."]
    write_text(results / "results.md", "\n".join(md) + "\n")
    write_text(results / "results.csv", long.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Scheduling


@dataclass
class Job:
    name: str  # log and display name
    args: list[str]  # arguments of this script's --one / --tune-one
    done: Path  # the JSON this job writes
    after: Path | None = None  # a JSON that must exist before it starts
    cores: int = 1  # of the --jobs cores it occupies


def plan(args: argparse.Namespace, out: Path, results: Path) -> list[Job]:
    jobs = []
    common = [str(EXP.dir), "--out", str(out), "--results", str(results), "--data", str(args.data),
              "--curve-every", str(args.curve_every), "--shared-workers", str(args.shared_workers),
              *(f"--set={o}" for o in args.overrides[1:])]
    common += ["--test-limit", str(args.test_limit)] if args.test_limit else []
    if args.tune_randaugment:
        for size in args.sizes:
            for n, m in GRID:
                jobs.append(Job(f"tune_{size_dir(size)}_n{n}_m{m}",
                                [*common, "--tune-one", str(size), str(n), str(m)], grid_path(results, size, n, m)))
        return jobs
    for size in args.sizes:
        for seed in args.seeds:
            for row in ROWS:
                if row.name not in args.rows or row.name in NOT_RUN:
                    continue
                done = result_path(results, size, row.name, seed)
                if row.uses_tuned_randaugment and done.is_file():
                    n, m, _ = tuned_randaugment(results, size)
                    old = json.loads(done.read_text())["randaugment"]
                    if (old["n"], old["m"]) != (n, m):  # superseded by the grid's choice: kept aside, rerun
                        done.rename(done.with_name(f"seed{seed}_n{old['n']}_m{old['m']}.json"))
                if row.name in SHARED_ROWS and done.is_file():
                    old = shared_workers(json.loads(done.read_text()))
                    if old != EXP.workers:  # another worker count: kept aside, rerun
                        done.rename(done.with_name(f"seed{seed}_w{old}.json"))
                after = result_path(results, size, row.after, seed) if row.after else None
                cores = EXP.workers if row.shared else 1
                jobs.append(Job(f"{size_dir(size)}_{row.name}_seed{seed}",
                                [*common, "--one", str(size), row.name, str(seed)], done, after, cores))
    return jobs


def schedule(jobs: list[Job], n_jobs: int, logs: Path, stop_after: float | None) -> int:
    """Run pending jobs as subprocesses on `n_jobs` cores (a job takes its `cores`, at least one job runs); a job waits
    for its `after` JSON. Returns failures."""
    logs.mkdir(parents=True, exist_ok=True)
    pending = [j for j in jobs if not j.done.is_file()]
    skipped = len(jobs) - len(pending)
    print(f"{len(jobs)} runs, {skipped} finished already, {len(pending)} to run ({n_jobs} at a time)", flush=True)
    running: dict[subprocess.Popen, tuple[Job, float]] = {}
    failures, started = 0, time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        while pending or running:
            late = stop_after is not None and time.monotonic() - started > stop_after
            for job in [j for j in pending if not late and (j.after is None or j.after.is_file())]:
                busy = sum(j.cores for j, _ in running.values())
                if running and busy + job.cores > n_jobs:
                    break
                pending.remove(job)
                if job.done.is_file():  # finished meanwhile by another invocation (say, one for other seeds)
                    print(f"skip {job.name}: finished elsewhere", flush=True)
                    continue
                with open(logs / f"{job.name}.log", "a") as log:  # the child keeps its own descriptor
                    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *job.args], stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
                running[proc] = (job, time.monotonic())
                print(f"start {job.name} (pid {proc.pid})", flush=True)
            blocked = [j for j in pending if j.after is not None and not j.after.is_file()
                       and not any(j.after == r.done for r, _ in running.values())
                       and not any(j.after == p.done for p in pending)]
            for job in blocked:  # its prerequisite failed or was not asked for
                pending.remove(job)
                print(f"skip {job.name}: {job.after} missing", flush=True)
            if late and not running:
                print(f"stop: --stop-after reached, {len(pending)} runs not started", flush=True)
                break
            time.sleep(2)
            for proc in [p for p in running if p.poll() is not None]:
                job, begun = running.pop(proc)
                ok = proc.returncode == 0 and job.done.is_file()
                failures += not ok
                print(f"{'done' if ok else 'FAILED'} {job.name} after {(time.monotonic() - begun) / 60:.1f} min"
                      + ("" if ok else f" (exit {proc.returncode}; log {logs / (job.name + '.log')})"), flush=True)
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        raise
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="experiment folder (experiment.json, row configs, test cases)")
    parser.add_argument("--out", type=Path, help="run folders (default: the experiment's)")
    parser.add_argument("--data", type=Path, help="data folder its prepare command wrote (default: the experiment's)")
    parser.add_argument("--results", type=Path, help="per-run JSON files and the tables (default EXPERIMENT/results)")
    parser.add_argument("--rows", nargs="+", default=[r.name for r in ROWS], choices=[r.name for r in ROWS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--sizes", nargs="+", type=int, help="training sizes (default: every size of the experiment)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cores: runs at once, one torch thread each (row shared takes --shared-workers)")
    parser.add_argument("--shared-workers", type=int, default=2, metavar="N",
                        help="workers of row shared, each on its own core (default 2)")
    parser.add_argument("--curve-every", type=int, default=4, help="epochs between learning-curve points")
    parser.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                        help="start no new run after this many minutes (running ones finish)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (smoke tests; the tables' runs use none)")
    parser.add_argument("--test-limit", type=int, default=None, help="score only the first N test cases (smoke tests)")
    parser.add_argument("--tune-randaugment", action="store_true", help="run the RandAugment N x M grid instead")
    parser.add_argument("--aggregate", action="store_true", help="only rebuild results.md and results.csv")
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "ROW", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--tune-one", nargs=3, type=int, metavar=("SIZE", "N", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.experiment / "experiment.json").is_file():
        parser.error(f"{args.experiment} holds no experiment.json; pass an experiment folder such as "
                     "experiments/hippocampus")
    if args.shared_workers < 1:
        parser.error(f"--shared-workers must be at least 1, got {args.shared_workers}")
    use_experiment(args.experiment, args.shared_workers)
    args.sizes = args.sizes or list(EXP.sizes)
    if unknown := sorted(set(args.sizes) - set(EXP.sizes)):
        parser.error(f"--sizes {unknown}: {EXP.title} has training sizes {list(EXP.sizes)}")
    args.data = args.data or EXP.data
    out, results = args.out or EXP.out, args.results or EXP.dir / "results"
    args.overrides = [f'data.root="{args.data}"', *args.overrides]
    if args.one:
        size, row, seed = int(args.one[0]), args.one[1], int(args.one[2])
        result = run_one(size, row, seed, out, results, args.curve_every, args.overrides, args.test_limit)
        print(json.dumps({c: {k: round(result["test"][c][k]["dice"], 4) for k in EXP.labels} for c in TTA}))
        return 0
    if args.tune_one:
        size, n, m = args.tune_one
        print(json.dumps(tune_one(size, n, m, out, results, args.overrides)))
        choose_randaugment(results, size)
        return 0
    failures = 0
    if not args.aggregate:
        if not (args.data / "dataset.json").is_file():
            print(f"error: {args.data} holds no dataset.json; run `{EXP.prepare}` first", file=sys.stderr)
            return 1
        jobs = plan(args, out, results)
        stop_after = None if args.stop_after is None else args.stop_after * 60
        failures = schedule(jobs, args.jobs, out / "logs", stop_after)
        if args.tune_randaugment:
            for size in args.sizes:
                choose_randaugment(results, size)
    write_tables(results)
    print(f"tables: {results / 'results.md'}, {results / 'results.csv'}; {failures} failed runs", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
