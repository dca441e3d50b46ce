"""Checkpoints are read with weights_only: a crafted file never runs code; the typed Checkpoint answers its readers."""

from __future__ import annotations

import pathlib

import pytest
import torch
from fake_run import LABELS, SMOKE, write_fake_run

from augsearch.artifacts.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from augsearch.cli import main
from augsearch.config import PreprocessConfig, load_config


class _Payload:
    """Unpickling this calls Path.touch(marker): the code execution a checkpoint must never get."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _crafted(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"format": "augsearch-checkpoint", "model": _Payload(marker)}, path)
    return path, marker


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    path, marker = _crafted(tmp_path)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(path)
    assert "Unsupported global" in str(err.value)  # names what it refused
    assert not marker.exists()


@pytest.mark.parametrize("command", ["predict", "train-resume", "inspect"])
def test_no_command_runs_code_from_a_checkpoint(tmp_path, capsys, command):
    path, marker = _crafted(tmp_path)
    argv = {
        "predict": ["predict", "--model", str(path), "--input", str(tmp_path), "--output", str(tmp_path / "out")],
        "train-resume": ["train", str(SMOKE), "--out", str(tmp_path / "run"), "--resume", str(path),
                         "--set", f"data.root={tmp_path / 'data'}"],
        "inspect": ["inspect", "logits", "--model", str(path), "--out", str(tmp_path / "m.png")],
    }[command]
    assert main(argv) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoint_accessors(tmp_path):
    run = write_fake_run(tmp_path / "run", epoch=3)
    ckpt = load_checkpoint(run)
    assert isinstance(ckpt, Checkpoint)
    assert (ckpt.epoch, ckpt.step, ckpt.dims, ckpt.num_classes, ckpt.in_channels) == (3, 3, 2, 3, 1)
    assert ckpt.label_names == LABELS and ckpt.patch_size == [32, 32]
    assert ckpt.preprocess == PreprocessConfig()
    assert ckpt.config_hash == load_config(SMOKE).fingerprint()
    assert ckpt.experiment_config() == load_config(SMOKE)
    model = ckpt.build_model()
    assert not model.training and model(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    # Everything in the file loads under weights_only (no pickled classes, not even torch's version string).
    raw = torch.load(run / "checkpoint.pt", weights_only=True)
    assert raw["versions"]["torch"] == torch.__version__


def test_a_truncated_checkpoint_is_a_clean_error(tmp_path):
    run = write_fake_run(tmp_path / "run")
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(run)


def test_a_checkpoint_of_an_earlier_version_still_loads(tmp_path):
    """Earlier versions stored torch.__version__ itself (a str subclass), which weights_only needs allowed."""
    run = write_fake_run(tmp_path / "run")
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload["versions"]["torch"] = torch.__version__
    torch.save(payload, run / "checkpoint.pt")
    assert load_checkpoint(run).epoch == 1
