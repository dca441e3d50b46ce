"""A built wheel carries its presets and schema: installed outside the checkout, it lists the presets, resolves a
packaged policy file by its relative name and runs a smoke train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_finds_presets_and_trains(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = wheels.glob("augsearch-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def augsearch(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "augsearch", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import augsearch; print(augsearch.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # the installed copy, not the checkout
    assert "nnunet" in augsearch("policy", "presets")
    assert "OK" in augsearch("policy", "validate", str(site / "augsearch" / "policies" / "presets" / "nnunet-3d.json"))
    config = work / "smoke.toml"
    config.write_text((REPO / "experiments" / "smoke.toml").read_text())
    sets = ["train.epochs=1", "train.iterations=2", "train.batch_size=2", "train.val_batch_size=2",
            f'data.root="{work / "data"}"', 'augment.policy="learned/quickstart/bench2d-joint.json"']
    out = augsearch("train", str(config), "--out", str(work / "run"), "--quiet",
                    *[a for s in sets for a in ("--set", s)])
    assert (work / "run" / "checkpoint.pt").is_file() and (work / "run" / "policy.json").is_file(), out
