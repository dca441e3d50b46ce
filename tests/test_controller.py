"""Search controller: space validation and expansion, in-process and Ray searches, restart, resume, bad input.

Ray tests share one loopback-only local Ray (2 CPUs, small object store) started by a module fixture, and check that
no Ray process listens beyond 127.0.0.1 and none is left behind.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
from processes import free_port
from smoke import SMOKE, set_args

from augsearch.cli import main
from augsearch.config import load_config
from augsearch.tune.search import SearchError
from augsearch.tune.space import (
    absolute_paths,
    config_keys,
    expand_trials,
    seeded_repeats,
    validate_space,
)
from augsearch.tune.trial import CRASH_ENV


def tiny(data_root: Path, *extra: str) -> list[str]:
    """Overrides that make the smoke config a seconds-long two-epoch run on a shared dataset."""
    sets = ["train.epochs=2", "train.iterations=2", f"data.root={json.dumps(str(data_root))}", *extra]
    return set_args(sets)


def summary(run_dir: Path) -> dict[str, dict]:
    return {row["trial"]: row for row in json.loads((run_dir / "summary.json").read_text())["trials"]}


def progress_epochs(run_dir: Path, trial: str) -> list[int]:
    """Epochs of every report Ray recorded for the trial, in order (restarts included)."""
    with open(run_dir / trial / "progress.csv") as handle:
        return [int(float(row["epoch"])) for row in csv.DictReader(handle)]


# ----------------------------------------------------------------------------------------------- no Ray


def test_config_keys_are_the_dotted_leaves():
    keys = config_keys()
    for key in ("seed", "data.split.fold", "augment.tra.lr", "augment.tea.lr", "augment.policy",
                "augment.tra.class_specific", "data.synth.seed", "train.epochs"):
        assert key in keys
    assert "augment.tra" not in keys and "data" not in keys


def test_unknown_space_key_names_the_nearest_valid_keys():
    base = load_config(SMOKE).to_dict()
    with pytest.raises(SearchError) as err:
        validate_space(base, {"augment.tra.lrr": [0.1]})
    assert "'augment.tra.lrr'" in str(err.value) and "augment.tra.lr" in str(err.value)
    with pytest.raises(SearchError, match="config rejects"):
        validate_space(base, {"augment.tra.lr": [0.1, -1.0]})
    with pytest.raises(SearchError, match="two increasing numbers"):
        validate_space(base, {"augment.tra.lr": {"uniform": [0.2, 0.1]}})
    with pytest.raises(SearchError, match="must be a list"):
        validate_space(base, {"augment.tra.lr": {"normal": [0.2, 0.1]}})
    validate_space(base, {"augment.tra.lr": {"loguniform": [0.01, 0.1]}, "data.split.fold": [0, 1, 2]})


def test_expand_trials_grid_times_samples_with_draws_in_range():
    space = {"seed": [0, 1, 2], "augment.tra.lr": {"loguniform": [0.01, 0.1]}, "data.split.fold": {"randint": [0, 5]},
             "augment.policy": {"choice": ["identity", "nnunet"]}}
    trials = expand_trials(space, num_samples=2, seed=7)
    assert len(trials) == 6
    assert [t["seed"] for t in trials] == [0, 1, 2, 0, 1, 2]
    assert all(0.01 <= t["augment.tra.lr"] <= 0.1 for t in trials)
    assert all(t["data.split.fold"] in range(5) for t in trials)
    assert {t["augment.policy"] for t in trials} <= {"identity", "nnunet"}
    assert expand_trials(space, num_samples=2, seed=7) == trials  # seeded


def test_repeats_of_a_point_get_their_own_seeds_unless_the_space_sets_one():
    assert seeded_repeats({}, 3, seed=5) == ({"seed": [5, 6, 7]}, 1)
    space = {"augment.tra.lr": {"loguniform": [0.01, 0.1]}}
    assert seeded_repeats(space, 2, seed=0) == ({**space, "seed": [0, 1]}, 1)
    assert seeded_repeats({"seed": [3, 4]}, 2, seed=0) == ({"seed": [3, 4]}, 2)
    assert seeded_repeats(space, 1, seed=0) == (space, 1)


def test_num_samples_without_a_space_trains_distinct_seeds(tmp_path, data_root):
    out = tmp_path / "search"
    args = ["search", str(SMOKE), "--no-ray", "--out", str(out), "--num-samples", "2",
            *tiny(data_root, "search.space={}", "seed=5")]
    assert main(args) == 0
    rows = [row for _, row in sorted(summary(out).items())]
    assert [row["params"] for row in rows] == [{"seed": 5}, {"seed": 6}]
    assert rows[0]["metrics"]["train/loss"] != rows[1]["metrics"]["train/loss"]  # not the same run twice


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.json").write_text("{}")
    tree = {"data": {"root": "runs/d", "split": {"splits_file": None}}, "augment": {"policy": "identity"}}
    fixed, space = absolute_paths(tree, {"augment.policy": ["p.json", "nnunet"]})
    assert fixed["data"]["root"] == str(tmp_path / "runs" / "d")
    assert fixed["augment"]["policy"] == "identity" and fixed["data"]["split"]["splits_file"] is None
    assert space["augment.policy"] == [str(tmp_path / "p.json"), "nnunet"]


def test_local_search_runs_every_trial_and_restarts_a_crash_from_its_checkpoint(tmp_path, data_root, monkeypatch,
                                                                                capsys):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, str(marker))
    out = tmp_path / "search"
    assert main(["search", str(SMOKE), "--no-ray", "--out", str(out), *tiny(data_root)]) == 0
    assert marker.exists()
    rows = summary(out)
    assert sorted(rows) == ["trial_00000", "trial_00001"]
    assert [rows[t]["params"]["seed"] for t in sorted(rows)] == [0, 1]
    assert all(r["status"] == "TERMINATED" and r["metrics"]["epoch"] == 2 for r in rows.values())
    # the first trial crashed after its epoch-1 checkpoint and continued from it; the second never crashed
    assert rows["trial_00000"]["metrics"]["resumed_epoch"] == 1
    assert rows["trial_00001"]["metrics"]["resumed_epoch"] == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "trial_00000" / "fit" / "metrics.jsonl").open()]
    assert epochs == [1, 2]
    for row in rows.values():
        assert (out / row["checkpoint"] / "checkpoint.pt").is_file()
        assert (out / row["checkpoint"] / "policy.json").is_file()
    text = capsys.readouterr().out
    assert "search summary" in text and "[smoke:trial_00001] epoch 2/2" in text
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["trial", "seed"] and "val/dice_rare" in header and "status" in header


def test_resume_dir_that_is_not_a_search(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["search", "--resume", str(tmp_path)]) == 2
    assert "is not a search directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_unknown_space_key_from_the_cli_writes_nothing(tmp_path, data_root, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(SMOKE.read_text() + '"augment.tea.lrr" = [0.1, 0.2]\n')
    out = tmp_path / "out"
    assert main(["search", str(config), "--out", str(out), *tiny(data_root)]) == 2
    err = capsys.readouterr().err
    assert "'augment.tea.lrr' is not a config key" in err and "augment.tea.lr" in err
    assert not out.exists()


def test_unreachable_address_fails_fast(tmp_path, data_root, capsys):
    port = free_port()
    out = tmp_path / "out"
    start = time.monotonic()
    assert main(["search", str(SMOKE), "--address", f"127.0.0.1:{port}", "--out", str(out), *tiny(data_root)]) == 2
    assert time.monotonic() - start < 20
    assert "cannot reach a Ray cluster at 127.0.0.1" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_two_ray_trials_run_report_and_checkpoint(local_ray, tmp_path, data_root, capsys):
    out = tmp_path / "search"
    assert main(["search", str(SMOKE), "--out", str(out), *tiny(data_root)]) == 0
    rows = summary(out)
    assert len(rows) == 2 and sorted(r["params"]["seed"] for r in rows.values()) == [0, 1]
    for trial, row in rows.items():
        assert row["status"] == "TERMINATED" and row["metrics"]["epoch"] == 2
        assert 0.0 <= row["metrics"]["val/dice_rare"] <= 1.0
        assert progress_epochs(out, trial) == [1, 2]  # one report per validation
        ckpt = out / row["checkpoint"]
        assert ckpt.parent.name == trial and (ckpt / "checkpoint.pt").is_file() and (ckpt / "policy.json").is_file()
        assert list((out / trial).glob("events.out.tfevents*"))  # Ray's TensorBoard logger stays on
        assert (out / trial / "fit" / "metrics.jsonl").is_file()
    text = capsys.readouterr().out
    assert "TERMINATED" in text and "search summary" in text  # Ray's status table, then ours


@pytest.mark.slow
def test_ray_trial_crash_restarts_from_its_last_checkpoint(local_ray, tmp_path, data_root, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, str(marker))
    out = tmp_path / "search"
    assert main(["search", str(SMOKE), "--out", str(out), *tiny(data_root, "train.epochs=3")]) == 0
    assert marker.exists()
    rows = summary(out)
    assert all(r["status"] == "TERMINATED" and r["metrics"]["epoch"] == 3 for r in rows.values())
    crashed = [t for t, r in rows.items() if r["metrics"]["resumed_epoch"] == 1]
    assert len(crashed) == 1
    # the crash came right after the epoch-1 report: the restart lost no epoch and repeated none
    assert progress_epochs(out, crashed[0]) == [1, 2, 3]


@pytest.mark.slow
def test_interrupted_search_resumes_without_repeating_finished_trials(local_ray, tmp_path, data_root, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed"))
    out = tmp_path / "search"
    args = tiny(data_root, "search.max_failures=0", "search.max_concurrent_trials=1")
    assert main(["search", str(SMOKE), "--out", str(out), *args]) == 1
    assert "--resume" in capsys.readouterr().err
    first = summary(out)
    assert sorted(r["status"] for r in first.values()) == ["ERROR", "TERMINATED"]
    (done,) = [t for t, r in first.items() if r["status"] == "TERMINATED"]
    (broken,) = [t for t, r in first.items() if r["status"] == "ERROR"]
    done_log = (out / done / "fit" / "metrics.jsonl").read_text()

    monkeypatch.delenv(CRASH_ENV)
    assert main(["search", "--resume", str(out)]) == 0
    second = summary(out)
    assert sorted(second) == sorted(first)
    assert all(r["status"] == "TERMINATED" for r in second.values())
    assert second[done]["metrics"] == first[done]["metrics"]
    assert (out / done / "fit" / "metrics.jsonl").read_text() == done_log  # not run again
    assert progress_epochs(out, done) == [1, 2]
    assert second[broken]["metrics"]["resumed_epoch"] == 1  # continued from its epoch-1 checkpoint
    assert progress_epochs(out, broken) == [1, 2]


@pytest.mark.slow
def test_more_gpus_per_trial_than_the_cluster_has(local_ray, tmp_path, data_root, capsys):
    out = tmp_path / "out"
    assert main(["search", str(SMOKE), "--gpus-per-trial", "4", "--out", str(out), *tiny(data_root)]) == 2
    err = capsys.readouterr().err
    assert "asks for 4 GPUs" in err and "largest node has 0" in err
    assert not out.exists()
