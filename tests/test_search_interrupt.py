"""An interrupted search (Ctrl-C) exits non-zero with how to resume, offers nothing for export, and export refuses
it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from augsearch.cli import main
from augsearch.tune import local

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


@pytest.mark.slow
def test_ctrl_c_in_a_ray_search(tmp_path):
    """SIGINT to a running `augsearch search` on its own local Ray: Tune saves its state and returns normally; the
    command must still say it was interrupted."""
    out = tmp_path / "search"
    sets = [f"data.root={tmp_path / 'data'}", "train.epochs=40", "train.iterations=2", "train.batch_size=2",
            "train.val_batch_size=2", "augment.tea.views=2", "search.max_concurrent_trials=1"]
    command = [sys.executable, "-m", "augsearch", "search", str(SMOKE), "--out", str(out),
               *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out.glob("*/fit/checkpoint.pt")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-2000:]
    assert f"interrupted; resume with augsearch search --resume {out}" in stderr
    assert "export it with" not in stdout + stderr
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
