"""Export: a training run's checkpoint + policy side by side with provenance; a search's best trial by validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from smoke import SMOKE, smoke_search

from augsearch.cli import main
from augsearch.config import load_config
from augsearch.policy.io import load_policy


def tiny_overrides(data_root: Path) -> list[str]:
    return ["train.epochs=2", "train.iterations=2", f"data.root={json.dumps(str(data_root))}"]


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    from augsearch.train import fit

    tmp = tmp_path_factory.mktemp("train")
    cfg = load_config(SMOKE, tiny_overrides(tmp / "data"))
    fit(cfg, tmp / "run")
    return tmp / "run", cfg


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory):
    """A finished two-trial in-process search (seed 0 and 1)."""
    tmp = tmp_path_factory.mktemp("search")
    return smoke_search(tmp, tiny_overrides(tmp / "data"))


def planted(search_dir: Path, tmp_path: Path, metrics: dict[str, dict[str, float]]) -> Path:
    """A copy of the search whose summary carries the given metrics per trial."""
    copy = tmp_path / "planted"
    shutil.copytree(search_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    for row in summary["trials"]:
        row["metrics"].update(metrics[row["trial"]])
    (copy / "summary.json").write_text(json.dumps(summary))
    return copy


def provenance(path: Path) -> dict:
    return json.loads(path.read_text())["provenance"]


def test_export_training_run(train_run, tmp_path):
    run, cfg = train_run
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").read_bytes() == (run / "checkpoint.pt").read_bytes()
    exported, source = load_policy(out / "policy.json"), load_policy(run / "policy.json")
    assert exported.op_names == source.op_names
    assert exported.tra_probs().tolist() == source.tra_probs().tolist()
    prov = provenance(out / "policy.json")
    assert prov["export"]["source"] == "augsearch train" and prov["export"]["run_dir"] == str(run.resolve())
    assert prov["export"]["epoch"] == 2
    # the run's own provenance is kept
    assert prov["config_sha256"] == cfg.fingerprint() and prov["seed"] == cfg.seed
    assert prov["data_fingerprint"] and prov["versions"]["augsearch"]


def test_export_search_picks_the_best_validation_trial(search_dir, tmp_path):
    # trial_00000 is best on validation, trial_00001 on test and on validation loss
    source = planted(search_dir, tmp_path, {
        "trial_00000": {"val/dice_rare": 0.80, "test/dice_rare": 0.10, "val/loss": 0.9},
        "trial_00001": {"val/dice_rare": 0.30, "test/dice_rare": 0.95, "val/loss": 0.2},
    })
    out = tmp_path / "best"
    assert main(["export", str(source), "--out", str(out)]) == 0
    trial0 = source / "trial_00000" / "fit" / "checkpoint.pt"
    trial1 = source / "trial_00001" / "fit" / "checkpoint.pt"
    assert trial0.read_bytes() != trial1.read_bytes()
    assert (out / "checkpoint.pt").read_bytes() == trial0.read_bytes()
    load_policy(out / "policy.json")
    prov = provenance(out / "policy.json")
    export = prov["export"]
    assert export["trial"] == "trial_00000" and export["params"] == {"seed": 0}
    assert export["metrics"]["val/dice_rare"] == 0.80 and "test/dice_rare" not in export["metrics"]
    assert export["search_metric"] == "val/dice_rare" and export["search_mode"] == "max"
    assert len(prov["config_sha256"]) == 64 and prov["seed"] == 0

    by_loss = tmp_path / "by_loss"
    assert main(["export", str(source), "--out", str(by_loss), "--metric", "val/loss"]) == 0
    assert (by_loss / "checkpoint.pt").read_bytes() == trial1.read_bytes()
    assert provenance(by_loss / "policy.json")["export"]["search_mode"] == "min"


def test_export_never_picks_a_failed_trial(search_dir, tmp_path, capsys):
    # trial_00000 validates best but failed part way: its checkpoint is a half-trained model
    source = planted(search_dir, tmp_path, {"trial_00000": {"val/dice_rare": 0.80},
                                            "trial_00001": {"val/dice_rare": 0.30}})
    summary = json.loads((source / "summary.json").read_text())
    summary["trials"][0]["status"] = "ERROR"
    (source / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "best"
    assert main(["export", str(source), "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").read_bytes() == (source / "trial_00001" / "fit" / "checkpoint.pt").read_bytes()
    summary["trials"][1]["status"] = "ERROR"
    (source / "summary.json").write_text(json.dumps(summary))
    assert main(["export", str(source), "--out", str(tmp_path / "none")]) == 2
    assert "failed (trial_00000, trial_00001)" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_export_refuses_test_metrics(search_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(search_dir), "--out", str(out), "--metric", "test/dice_rare"]) == 2
    assert "validation metrics" in capsys.readouterr().err
    assert not out.exists()


def test_export_all_trials(search_dir, tmp_path):
    out = tmp_path / "all"
    assert main(["export", str(search_dir), "--out", str(out), "--all"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["trial_00000", "trial_00001"]
    for trial in ("trial_00000", "trial_00001"):
        assert (out / trial / "checkpoint.pt").read_bytes() == (
            search_dir / trial / "fit" / "checkpoint.pt"
        ).read_bytes()
        assert provenance(out / trial / "policy.json")["export"]["trial"] == trial
        load_policy(out / trial / "policy.json")


def test_export_of_a_directory_that_is_neither(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("x")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "neither a training run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _strict_json(path: Path) -> dict:
    """Parse as strict JSON parsers do: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_export_breaks_metric_ties_by_mean_foreground_dice_and_writes_strict_json(search_dir, tmp_path, capsys):
    # Both trials miss the rare class; the first listed is worse on the other foreground class.
    source = planted(search_dir, tmp_path, {
        "trial_00000": {"val/dice_rare": 0.0, "val/dice_mean": 0.385, "val/dice_organ": 0.77, "val/hd95": float("nan")},
        "trial_00001": {"val/dice_rare": 0.0, "val/dice_mean": 0.478, "val/dice_organ": 0.956,
                        "val/hd95": float("inf")},
    })
    out = tmp_path / "best"
    assert main(["export", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tied with trial_00000" in printed and "val/dice_mean = 0.478" in printed
    assert (out / "checkpoint.pt").read_bytes() == (source / "trial_00001" / "fit" / "checkpoint.pt").read_bytes()
    export = _strict_json(out / "policy.json")["provenance"]["export"]
    assert export["trial"] == "trial_00001" and "mean foreground validation Dice" in export["selection"]
    assert export["metrics"]["val/hd95"] is None  # written as null, read back as None
    assert load_policy(out / "policy.json").op_names


def test_export_of_several_searches_takes_the_best_trial_of_all_of_them(search_dir, tmp_path, capsys):
    # two searches of the same data, as if started from two policies; the second holds the best trial overall
    first = planted(search_dir, tmp_path / "a", {"trial_00000": {"val/dice_rare": 0.40},
                                                 "trial_00001": {"val/dice_rare": 0.50}})
    second = planted(search_dir, tmp_path / "b", {"trial_00000": {"val/dice_rare": 0.70},
                                                  "trial_00001": {"val/dice_rare": 0.20}})
    out = tmp_path / "best"
    assert main(["export", str(first), str(second), "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").read_bytes() == (second / "trial_00000" / "fit" / "checkpoint.pt").read_bytes()
    export = provenance(out / "policy.json")["export"]
    assert export["run_dir"] == str(second.resolve()) and export["trial"] == "trial_00000"
    assert export["compared"] == [str(first.resolve()), str(second.resolve())]
    assert f"{first}: trial_00001 0.5" in export["selection"] and f"{second}: trial_00000 0.7" in export["selection"]
    assert "0.7" in capsys.readouterr().out
    # by another validation metric the first search wins
    by_loss = tmp_path / "by_loss"
    for folder, losses in ((first, (0.1, 0.3)), (second, (0.5, 0.6))):
        summary = json.loads((folder / "summary.json").read_text())
        for row, loss in zip(summary["trials"], losses):
            row["metrics"]["val/loss"] = loss
        (folder / "summary.json").write_text(json.dumps(summary))
    assert main(["export", str(first), str(second), "--out", str(by_loss), "--metric", "val/loss"]) == 0
    assert provenance(by_loss / "policy.json")["export"]["run_dir"] == str(first.resolve())


def test_export_of_several_searches_refuses_what_does_not_compare(search_dir, train_run, tmp_path, capsys):
    first = planted(search_dir, tmp_path / "a", {"trial_00000": {}, "trial_00001": {}})
    other_data = planted(search_dir, tmp_path / "b", {"trial_00000": {}, "trial_00001": {}})
    manifest = json.loads((other_data / "search.json").read_text())
    manifest["config"]["data"]["split"]["fold"] = 3
    (other_data / "search.json").write_text(json.dumps(manifest))
    other_metric = planted(search_dir, tmp_path / "c", {"trial_00000": {}, "trial_00001": {}})
    manifest = json.loads((other_metric / "search.json").read_text())
    manifest["metric"] = "val/dice_mean"
    (other_metric / "search.json").write_text(json.dumps(manifest))
    cases = [([str(first), str(other_data)], "validate on different data"),
             ([str(first), str(other_metric)], "different metrics"),
             ([str(first), str(train_run[0])], "not a search directory"),
             ([str(first), str(first), "--all"], "--all exports every trial of one search")]
    for args, message in cases:
        out = tmp_path / "out"
        assert main(["export", *args, "--out", str(out)]) == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists()
