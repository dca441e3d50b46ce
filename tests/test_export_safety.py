"""Export and predict never write outside their output or over existing files unasked; a crafted summary.json
cannot lead export out of the search folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_run import SMOKE, write_fake_run

from augsearch.cli import main
from augsearch.config import load_config
from augsearch.tune.export import ExportError, export


def _search(tmp_path: Path, trial: str, checkpoint: str) -> Path:
    """A finished search folder whose summary names TRIAL and CHECKPOINT; a real run sits at trial_00000/fit."""
    run = tmp_path / "search"
    write_fake_run(run / "trial_00000" / "fit")
    cfg = load_config(SMOKE).to_dict()
    (run / "search.json").write_text(json.dumps({"format": "augsearch-search", "config": cfg,
                                                 "metric": "val/dice_rare", "mode": "max"}))
    row = {"params": {}, "status": "TERMINATED", "metrics": {"val/dice_rare": 0.5}}
    rows = [{**row, "trial": "trial_00000", "checkpoint": "trial_00000/fit"},
            {**row, "trial": trial, "checkpoint": checkpoint}]
    (run / "summary.json").write_text(json.dumps({"metric": "val/dice_rare", "mode": "max", "trials": rows}))
    return run


def test_a_plain_search_exports_every_trial(tmp_path):
    run = _search(tmp_path, "trial_00001", "trial_00000/fit")
    written = export(run, tmp_path / "out", all_trials=True)
    assert [p.name for p in written] == ["trial_00000", "trial_00001"]


@pytest.mark.parametrize("trial, checkpoint", [
    ("../escaped", "trial_00000/fit"),
    ("/tmp/abs", "trial_00000/fit"),
    ("trial_00001", "../outside"),
    ("trial_00001", "/etc"),
    ("trial_00001", "link/fit"),
])
def test_names_that_leave_the_folder_are_refused(tmp_path, trial, checkpoint):
    outside = write_fake_run(tmp_path / "outside")
    run = _search(tmp_path, trial, checkpoint)
    os.symlink(outside.parent, run / "link")  # link/fit -> a run outside the search folder
    out = tmp_path / "exports" / "out"
    with pytest.raises(ExportError, match="summary.json"):
        export(run, out, all_trials=True)
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").rglob("*.pt"))


def test_export_refuses_an_output_that_holds_files(tmp_path, capsys):
    run = write_fake_run(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 0
    first = (out / "policy.json").read_text()
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "policy.json").read_text() == first
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0


def test_predict_refuses_an_output_that_holds_files(tmp_path, capsys):
    run = write_fake_run(tmp_path / "run")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "case_000.nii.gz").write_bytes(b"another model's prediction")
    assert main(["predict", "--model", str(run), "--input", str(tmp_path), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "case_000.nii.gz").read_bytes() == b"another model's prediction"
