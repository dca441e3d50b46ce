"""experiments/protocol on its two experiments (MSD Hippocampus, the bundled benchmark): every row shares one recipe,
the paired statistics behind the tables, and a whole run of the bundled experiment at a few steps."""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from augsearch.config import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
EXPERIMENT = EXPERIMENTS / "hippocampus"
PROTOCOL = EXPERIMENTS / "protocol"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"protocol_{name}", PROTOCOL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load("run")
run.use_experiment(EXPERIMENT)


@pytest.mark.parametrize(("folder", "steps", "patch"),
                         [("hippocampus", 2000, [32, 32, 32]), ("bundled", 1000, [64, 64])])
def test_rows_differ_from_the_no_augmentation_row_only_in_name_and_augment(folder, steps, patch):
    experiment = EXPERIMENTS / folder
    base = load_config(experiment / "none.toml").to_dict()
    trained = [row.name for row in run.ROWS if row.name not in run.NOT_RUN and row.config is None]
    assert sorted(p.stem for p in experiment.glob("*.toml")) == sorted([*trained, "tea_posthoc"])
    assert all(experiment / f"{row.config}.toml" in experiment.glob("*.toml") for row in run.ROWS if row.config)
    for name in trained:
        cfg = load_config(experiment / f"{name}.toml").to_dict()
        assert {k: v for k, v in cfg.items() if k not in ("name", "augment")} == \
               {k: v for k, v in base.items() if k not in ("name", "augment")}, name
    assert base["train"]["epochs"] * base["train"]["iterations"] == steps and base["train"]["patch_size"] == patch
    posthoc = load_config(experiment / "tea_posthoc.toml")
    assert not posthoc.train.update_model and posthoc.augment.tea.learn and not posthoc.augment.tra.learn


@pytest.mark.slow
def test_the_bundled_experiment_runs_end_to_end_and_pairs_on_the_lesion(tmp_path):
    """prepare.py, then a fixed, the joint and the retrain row at a few steps: per-run JSON and the tables."""
    bundled = EXPERIMENTS / "bundled"
    data = tmp_path / "data"
    assert subprocess.run([sys.executable, str(bundled / "prepare.py"), "--out", str(data)], check=False,
                          capture_output=True).returncode == 0
    splits = json.loads((data / "splits_final.json").read_text())
    assert [len(f["train"]) for f in splits] == [6, 12] and splits[0]["train"] == splits[1]["train"][:6]
    assert not set(splits[1]["train"] + splits[1]["val"]) & set(json.loads((bundled / "test_cases.json").read_text()))
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(PROTOCOL / "run.py"), str(bundled), "--rows", "none", "joint", "retrain", "--seeds", "0",
         "--sizes", "6", "--jobs", "2", "--out", str(tmp_path / "runs"), "--results", str(results), "--data",
         str(data), "--set", "train.epochs=2", "--set", "train.iterations=3", "--set", "augment.warmup_iterations=2",
         "--test-limit", "3", "--curve-every", "1"], check=False, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / "logs").glob("*.log"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    retrain = json.loads((results / "train6" / "retrain" / "seed0.json").read_text())
    assert retrain["segmenter_steps"] == 6 and retrain["test_cases"] == 3 and retrain["meta_steps"] == 0
    assert any("runs/train6/joint/seed0/policy.json" in o for o in retrain["overrides"])
    kept = results / "train6" / "joint" / "seed0.policy.json"  # joint's final policy, kept beside the results
    assert kept.read_bytes() == (tmp_path / "runs" / "train6" / "joint" / "seed0" / "policy.json").read_bytes()
    assert not (results / "train6" / "none" / "seed0.policy.json").exists()
    # on another machine (no run folders): the retrain trains with the kept policy
    other_runs = tmp_path / "other_runs"
    (results / "train6" / "retrain" / "seed0.json").unlink()
    elsewhere = [*(str(other_runs) if a == str(tmp_path / "runs") else a for a in done.args)]
    again = subprocess.run([*elsewhere[:3], "--rows", "retrain", *elsewhere[7:]], check=False, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    retrain = json.loads((results / "train6" / "retrain" / "seed0.json").read_text())
    assert any(str(kept) in o for o in retrain["overrides"])
    first = json.loads((results / "train6" / "none" / "seed0.json").read_text())
    (results / "train6" / "none" / "seed0.json").unlink()  # an interrupted run: trained and scored, no JSON yet
    scores = tmp_path / "runs" / "train6" / "none" / "seed0" / "tta_none" / "evaluation.csv"
    stamp = scores.stat().st_mtime_ns
    again = subprocess.run([*done.args[:3], "--rows", "none", *done.args[7:]], check=False, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((results / "train6" / "none" / "seed0.json").read_text())["test"] == first["test"]
    assert scores.stat().st_mtime_ns == stamp  # the scores were read back, not predicted again
    table = (results / "results.md").read_text()
    assert "# Bundled 2D benchmark results" in table and "Mean Dice over lesion (%)" in table
    assert "**none** without TTA" in table and "| joint | none | 1 |" in table


@pytest.mark.slow
def test_the_shared_rows_run_one_policy_over_two_workers_and_retrain_with_it(tmp_path):
    """Row shared: a shared search on the embedded local Ray, worker 0's segmenter scored with the pooled policy;
    row shared_retrain: a fresh segmenter trained with that policy fixed."""
    bundled = EXPERIMENTS / "bundled"
    data = tmp_path / "data"
    assert subprocess.run([sys.executable, str(bundled / "prepare.py"), "--out", str(data)], check=False,
                          capture_output=True).returncode == 0
    results, runs = tmp_path / "results", tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, str(PROTOCOL / "run.py"), str(bundled), "--rows", "shared", "shared_retrain", "--seeds", "0",
         "--sizes", "6", "--jobs", "2", "--out", str(runs), "--results", str(results), "--data", str(data),
         "--set", "train.epochs=2", "--set", "train.iterations=3", "--set", "augment.warmup_iterations=2",
         "--test-limit", "2"], check=False, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in (runs / "logs").glob("*.log"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    shared = json.loads((results / "train6" / "shared" / "seed0.json").read_text())
    assert [w["worker"] for w in shared["workers"]] == [0, 1] and shared["segmenter_steps"] == 6
    assert shared["meta_steps"] == 4 and all(w["meta_steps"] == 4 for w in shared["workers"])
    assert shared["train_epoch_s"] == pytest.approx(sum(w["epoch_s"] for w in shared["workers"]))
    assert shared["shared_workers"] == 2
    search = runs / "train6" / "shared_w2" / "seed0" / "search"
    fits = sorted(search.glob("*/fit"))
    policies = [json.loads((f / "policy.json").read_text()) for f in fits]
    assert len(fits) == 2 and policies[0]["tra"] == policies[1]["tra"]  # one policy, learned by both workers
    assert sorted(json.loads((f / "config.json").read_text())["seed"] for f in fits) == [0, 1000]
    assert all(len(p["provenance"]["train_cases"]) == 6 for p in policies)  # search.shard = "all"
    retrain = json.loads((results / "train6" / "shared_retrain" / "seed0.json").read_text())
    assert retrain["meta_steps"] == 0
    assert any("runs/train6/shared_w2/seed0/policy.json" in o for o in retrain["overrides"])
    table = (results / "results.md").read_text()
    assert "| shared_retrain - shared | 1 |" in table and "joint, one policy shared by workers (2) | 1 |" in table
    # another worker count: the two-worker results are set aside and both rows run again (not here: planned only)
    args = run.argparse.Namespace(tune_randaugment=False, sizes=[6], seeds=[0], rows=["shared", "shared_retrain"],
                                  data=data, curve_every=4, overrides=["x"], test_limit=None, shared_workers=3)
    run.use_experiment(bundled, workers=3)
    try:
        jobs = run.plan(args, runs, results)
    finally:
        run.use_experiment(EXPERIMENT)
    assert [j.cores for j in jobs] == [3, 1] and not any(j.done.is_file() for j in jobs)
    assert (results / "train6" / "shared" / "seed0_w2.json").is_file()
    assert (results / "train6" / "shared_retrain" / "seed0_w2.json").is_file()


def test_the_rows_from_randaugment_take_the_grids_choice_and_set_an_older_choice_aside(tmp_path):
    """tra_from_randaugment learns from the tuned marginals; randaugment_marginals keeps them fixed (its control)."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    (results / "train10").mkdir(parents=True)
    (results / "train10" / "randaugment_tuned.json").write_text(json.dumps({"choice": {"n": 1, "m": 3}}))
    cfg = load_config(run.EXP.config("tra_from_randaugment"),
                      run.overrides_for(10, "tra_from_randaugment", 0, runs, results))
    assert cfg.augment.policy == "randaugment-marginals" and (cfg.augment.randaugment_n, cfg.augment.randaugment_m) \
        == (1, 3)
    assert cfg.augment.tra.learn and not cfg.augment.tra.class_specific  # the class-agnostic row's config
    assert run.run_dir_for(runs, 10, "tra_from_randaugment", 0, results) == \
        runs / "train10" / "tra_from_randaugment_n1_m3" / "seed0"
    # a shared search from the marginals is keyed by both: another N, M or another worker count is another run
    assert run.run_dir_for(runs, 10, "shared_from_randaugment", 0, results) == \
        runs / "train10" / f"shared_from_randaugment_n1_m3_w{run.EXP.workers}" / "seed0"
    old = results / "train10" / "tra_from_randaugment" / "seed0.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"randaugment": {"n": 2, "m": 2, "tuned": False}}))
    args = run.argparse.Namespace(tune_randaugment=False, sizes=[10], seeds=[0], rows=["tra_from_randaugment"],
                                  data=tmp_path, curve_every=4, overrides=["x"], test_limit=None, shared_workers=2)
    [job] = run.plan(args, runs, results)
    assert job.done == old and not old.is_file() and (old.parent / "seed0_n2_m2.json").is_file()
    control = load_config(run.EXP.config("randaugment_marginals"),
                          run.overrides_for(10, "randaugment_marginals", 0, runs, results))
    assert control.augment.policy == "randaugment-marginals" and not control.augment.tra.learn
    assert (control.augment.randaugment_n, control.augment.randaugment_m) == (1, 3)


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


def tables_of(runs: list[dict], results: Path) -> str:
    """results.md written by the protocol from these per-run results, saved as its JSON files under RESULTS."""
    for r in runs:
        path = run.result_path(results, r["size"], r["row"], r["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    run.write_tables(results)
    return (results / "results.md").read_text()


def test_tables_pair_learned_rows_with_the_best_fixed_row_by_validation(tmp_path):
    # nnunet has the higher validation Dice but the lower test Dice: validation, not test, picks the comparator
    runs = [_result("none", s, 0.80, 0.70) for s in range(3)] + [_result("nnunet", s, 0.70, 0.75) for s in range(3)]
    runs += [_result("joint", s, 0.70 + 0.01 * s, 0.7) for s in range(3)]
    md = tables_of(runs, tmp_path)
    assert "**nnunet** without TTA" in md
    joint_none = next(line for line in md.splitlines() if line.startswith("| joint | none |"))
    assert "| 3 | +1.0 |" in joint_none and "| 2/3 |" in joint_none  # differences 0, +1, +2 points
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0] == "size,row,seed,tta,class,metric,value"
    assert len(rows) == 1 + 9 * len(run.TTA) * len(run.EXP.labels) * 4
    assert np.isclose(float(rows[1].split(",")[-1]), 0.8)


def test_a_table_from_several_machines_names_them_and_times_each_apart(tmp_path):
    runs = [_result("none", s, 0.80, 0.70) for s in range(2)] + [_result("nnunet", s, 0.70, 0.75) for s in range(2)]
    runs[1].update(machine="gpu box", train_epoch_s=10.0)  # none seed 1 ran elsewhere
    md = tables_of(runs, tmp_path)
    assert "Machines: M1 = gpu box; M2 = m." in md
    none_row = next(line for line in md.splitlines() if line.startswith("| 1 | none |"))
    assert "| 10 (M1), 60 (M2) |" in none_row  # not their mean, 35
    assert "| 60 (M2) |" in next(line for line in md.splitlines() if line.startswith("| 2 |"))
    assert "| none | 1 | M1 |" in md and "| nnunet | 0 | M2 |" in md


def test_the_chosen_start_rows_take_the_search_with_the_higher_validation_dice_and_retrain_its_policy():
    runs = [_result("shared", 0, 0.50, 0.60), _result("shared_from_randaugment", 0, 0.40, 0.70),
            _result("shared_retrain", 0, 0.55, 0.90), _result("shared_from_randaugment_retrain", 0, 0.45, 0.65),
            _result("shared", 1, 0.50, 0.80), _result("shared_retrain", 1, 0.55, 0.90)]  # seed 1: one start only
    made = {r["row"]: r for r in run.chosen(runs)}
    assert set(made) == {"shared_chosen_start", "shared_chosen_start_retrain"}  # nothing for seed 1
    search, retrain = made["shared_chosen_start"], made["shared_chosen_start_retrain"]
    assert (search["seed"], search["chosen_from"], search["test"]) == (0, "shared_from_randaugment",
                                                                       runs[1]["test"])
    # the retrain follows its search's validation, not its own (shared_retrain validates higher)
    assert retrain["chosen_from"] == "shared_from_randaugment_retrain" and retrain["test"] == runs[3]["test"]
    assert (search["train_epoch_s"], retrain["train_epoch_s"]) == (120.0, 240.0)  # the compute of every run needed
    assert not [job for job in run.plan(_plan_args(["shared_chosen_start"]), Path("out"), Path("res"))]


def _plan_args(rows: list[str]):
    return argparse.Namespace(rows=rows, sizes=[10], seeds=[0], tune_randaugment=False, data=Path("data"),
                              curve_every=4, shared_workers=2, overrides=["data.root=x"], test_limit=None)


def test_a_variant_runs_another_experiments_configs_with_its_own_overrides_and_data():
    variant = run.Experiment.load(EXPERIMENTS / "bundled_fg_gamma_up")
    assert variant.config("joint").resolve() == (EXPERIMENTS / "bundled" / "joint.toml").resolve()
    assert variant.test_cases() == json.loads((EXPERIMENTS / "bundled" / "test_cases.json").read_text())
    cfg = load_config(EXPERIMENTS / "bundled" / "joint.toml", list(variant.overrides))
    assert cfg.train.patch_size == [32, 32] and variant.paired == ("lesion",)
    assert "--shift fg_gamma_up --size 128" in variant.prepare and str(variant.data) in variant.prepare


def test_pair_compares_two_folders_on_their_common_seeds(tmp_path, capsys):
    pair = _load("pair")

    def write(folder: Path, dice: dict[int, float]) -> Path:
        folder.mkdir(parents=True)
        for seed, value in dice.items():
            test = {"none": {"lesion": {"dice": value}}, "learned": {"lesion": {"dice": value + 0.1}}}
            (folder / f"seed{seed}.json").write_text(json.dumps({"seed": seed, "test": test}))
        return folder

    a = write(tmp_path / "a", {0: 0.30, 1: 0.40, 2: 0.35, 3: 0.9})
    b = write(tmp_path / "b", {0: 0.20, 1: 0.45, 2: 0.25})
    pair.main([str(a), str(b)])
    out = capsys.readouterr().out
    assert "over seeds [0, 1, 2]: +5.0" in out and "A wins 2/3" in out  # seed 3 has no partner
    low, high = run.bootstrap_ci([10.0, -5.0, 10.0])
    assert f"[{low:+.1f}, {high:+.1f}]" in out
    pair.main([str(a), str(b), "--column", "learned", "--column-b", "none"])
    assert "over seeds [0, 1, 2]: +15.0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="seed<k>.json"):
        pair.main([str(tmp_path), str(b)])


def test_pair_averages_the_experiments_paired_labels_or_the_ones_asked(tmp_path, capsys):
    pair = _load("pair")
    experiment = tmp_path / "hippo"
    experiment.mkdir()
    spec = {"title": "t", "labels": ["Anterior", "Posterior"], "sizes": {"10": 0}, "data": "d", "out": "o",
            "prepare": "p"}
    (experiment / "experiment.json").write_text(json.dumps(spec))
    folders = {}
    for row, scores in (("a", (0.80, 0.70)), ("b", (0.70, 0.70))):
        folders[row] = experiment / "results" / "train10" / row
        folders[row].mkdir(parents=True)
        test = {"none": {"Anterior": {"dice": scores[0]}, "Posterior": {"dice": scores[1]}}}
        (folders[row] / "seed0.json").write_text(json.dumps({"seed": 0, "test": test}))
    pair.main([str(folders["a"]), str(folders["b"])])  # no `paired` in experiment.json: every label
    assert "over seeds [0]: +5.0" in capsys.readouterr().out
    pair.main([str(folders["a"]), str(folders["b"]), "--label", "Anterior"])
    assert "over seeds [0]: +10.0" in capsys.readouterr().out
    (experiment / "experiment.json").write_text(json.dumps({**spec, "paired": ["Posterior"]}))
    pair.main([str(folders["a"]), str(folders["b"])])
    assert "over seeds [0]: +0.0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"expected labels \['lesion'\].*found \['Anterior', 'Posterior'\]"):
        pair.main([str(folders["a"]), str(folders["b"]), "--label", "lesion"])
