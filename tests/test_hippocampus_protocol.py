"""experiments/hippocampus: every row shares one recipe, and the paired statistics behind its tables."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

from augsearch.config import load_config

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "hippocampus"
PROTOCOL = Path(__file__).resolve().parents[1] / "experiments" / "protocol"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"protocol_{name}", PROTOCOL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load("run")
run.use_experiment(EXPERIMENT)


def test_rows_differ_from_the_no_augmentation_row_only_in_name_and_augment():
    base = load_config(EXPERIMENT / "none.toml").to_dict()
    trained = [row.name for row in run.ROWS if row.name not in run.DERIVED]
    assert sorted(p.stem for p in EXPERIMENT.glob("*.toml")) == sorted([*trained, "tea_posthoc"])
    for name in trained:
        cfg = load_config(EXPERIMENT / f"{name}.toml").to_dict()
        assert {k: v for k, v in cfg.items() if k not in ("name", "augment")} == \
               {k: v for k, v in base.items() if k not in ("name", "augment")}, name
    steps = base["train"]["epochs"] * base["train"]["iterations"]
    assert steps == 2000 and base["train"]["patch_size"] == [32, 32, 32]
    posthoc = load_config(EXPERIMENT / "tea_posthoc.toml")
    assert not posthoc.train.update_model and posthoc.augment.tea.learn and not posthoc.augment.tra.learn


def test_bootstrap_interval_covers_the_mean_and_narrows_with_agreement():
    low, high = run.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert low < 3.0 < high and low >= 1.0 and high <= 5.0
    assert run.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in run.bootstrap_ci([1.0]))


def _result(row: str, seed: int, dice: float, val: float) -> dict:
    metrics = {"dice": dice, "hd95": 3.0, "sensitivity": dice, "precision": dice, "hd95_defined": 140}
    return {"size": 10, "row": row, "seed": seed, "source": "commit x", "machine": "m", "meta_steps": 0,
            "tea_steps": 0, "train_epoch_s": 60.0, "wall_s": {"train": 60.0, "eval": 60.0},
            "val": {f"val/dice_{k}": val for k in run.EXP.labels}, "curve_summary": {},
            "randaugment": {"n": 2, "m": 2, "tuned": False} if row == "randaugment" else None,
            "test": {c: {k: metrics for k in run.EXP.labels} for c in run.TTA}}


def test_tables_pair_learned_rows_with_the_best_fixed_row_by_validation(tmp_path):
    # nnunet has the higher validation Dice but the lower test Dice: validation, not test, picks the comparator
    runs = [_result("none", s, 0.80, 0.70) for s in range(3)] + [_result("nnunet", s, 0.70, 0.75) for s in range(3)]
    runs += [_result("joint", s, 0.70 + 0.01 * s, 0.7) for s in range(3)]
    for r in runs:
        path = run.result_path(tmp_path, r["size"], r["row"], r["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    run.write_tables(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "**nnunet** without TTA" in md
    joint_none = next(line for line in md.splitlines() if line.startswith("| joint | none |"))
    assert "| 3 | +1.0 |" in joint_none and "| 2/3 |" in joint_none  # differences 0, +1, +2 points
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0] == "size,row,seed,tta,class,metric,value"
    assert len(rows) == 1 + 9 * len(run.TTA) * len(run.EXP.labels) * 4
    assert np.isclose(float(rows[1].split(",")[-1]), 0.8)
