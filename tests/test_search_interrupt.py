"""An interrupted search (Ctrl-C) exits non-zero with how to resume, offers nothing for export, and export refuses it."""

from __future__ import annotations

import json
from pathlib import Path

from augsearch.cli import main
from augsearch.tune import local
from augsearch.tune.ray_tune import tune_interrupted

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"


def test_ctrl_c_in_a_local_search(tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted_trial(**kwargs):
        calls.append(kwargs["trial_id"])
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "run_trial", interrupted_trial)
    out = tmp_path / "search"
    sets = [f"data.root={tmp_path / 'data'}", "train.epochs=1", "train.iterations=1"]
    assert main(["search", str(SMOKE), "--no-ray", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 130
    captured = capsys.readouterr()
    assert f"interrupted; resume with augsearch search --resume {out.resolve()}" in captured.err
    assert "export it with" not in captured.out + captured.err
    assert calls == ["trial_00000"]
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 2
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "export").exists()


def test_tune_interrupted_when_a_trial_has_not_ended_or_never_began():
    class Grid:
        def __init__(self, n, terminated, errors):
            self.n, self.num_terminated, self.num_errors = n, terminated, errors

        def __len__(self):
            return self.n

    assert not tune_interrupted(Grid(2, 2, 0), expected=2)
    assert not tune_interrupted(Grid(2, 1, 1), expected=2)  # a failed trial is an ending: --resume retries it
    assert tune_interrupted(Grid(2, 1, 0), expected=2)  # one still running when Ctrl-C came
    assert tune_interrupted(Grid(1, 1, 0), expected=2)  # one never created
