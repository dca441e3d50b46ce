"""Non-finite updates of the segmenter, the TRA policy and the TEA policy are skipped, counted, and stop the run
after train.max_nonfinite_in_a_row in a row; no NaN ever reaches a checkpoint or a policy file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.cli import main
from augsearch.learn.guard import NonFiniteError, NonFiniteGuard, guarded_step
from augsearch.policy.io import load_policy

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"


def test_an_overflowing_adam_step_is_undone():
    logits = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=1e38)  # lr / bias correction overflows float32 inside the step
    logits.grad = torch.ones(4)
    assert not guarded_step(optimizer, [logits])
    assert torch.equal(logits.detach(), torch.zeros(4)) and not optimizer.state
    optimizer = torch.optim.Adam([logits], lr=0.1)
    logits.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    assert not guarded_step(optimizer, [logits])
    logits.grad = torch.ones(4)
    assert guarded_step(optimizer, [logits]) and bool((logits < 0).all())


def test_the_guard_stops_after_the_limit_in_a_row():
    guard = NonFiniteGuard(limit=3)
    for ok in (False, False, True, False, False):
        guard.record("tea", ok, step=1)
    assert guard.skipped["tea"] == 4 and guard.in_a_row["tea"] == 2
    with pytest.raises(NonFiniteError, match=r"augment\.tea\.lr"):
        guard.record("tea", False, step=9)


def _train(tmp_path, *sets):
    args = ["train", str(SMOKE), "--out", str(tmp_path / "run"), "--quiet"]
    for item in (f"data.root={tmp_path / 'data'}", "train.iterations=3", "train.batch_size=2",
                 "train.val_batch_size=2", "augment.tea.views=2", *sets):
        args += ["--set", item]
    return main(args)


def _assert_finite_outputs(run: Path):
    if (run / "checkpoint.pt").is_file():
        ckpt = load_checkpoint(run)
        assert all(bool(torch.isfinite(v).all()) for v in ckpt.model_state.values() if v.is_floating_point())
    if (run / "policy.json").is_file():
        load_policy(run / "policy.json")  # validates: finite logits and probabilities


def test_a_diverging_segmenter_stops_with_a_clear_error(tmp_path, capsys):
    assert _train(tmp_path, "train.optimizer=\"sgd\"", "train.lr=1e12", "train.max_nonfinite_in_a_row=2",
                  "train.epochs=3") == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "train.lr" in err and "Traceback" not in err
    _assert_finite_outputs(tmp_path / "run")


def test_a_huge_tra_lr_is_skipped_not_a_crash(tmp_path):
    assert _train(tmp_path, "augment.tra.lr=1e38", "train.epochs=1") == 0
    _assert_finite_outputs(tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["nonfinite/tra"] == 3 and metrics["meta/steps"] == 0
    assert math.isfinite(metrics["train/loss"])
