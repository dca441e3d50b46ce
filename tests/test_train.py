"""fit end to end on a tiny benchmark: outputs, resume, modes, and bad configuration."""

import json
import math
from pathlib import Path

import pytest
import torch

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.cli import main
from augsearch.config import ConfigError, load_config
from augsearch.policy.io import load_policy
from augsearch.train import fit

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"


def tiny(data_root, **overrides):
    base = {"data.root": str(data_root), "train.epochs": 2, "train.iterations": 2, "train.batch_size": 2,
            "train.val_batch_size": 2, "augment.tea.views": 3}
    base.update(overrides)
    return load_config(SMOKE, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def test_joint_fit_writes_checkpoint_policy_metrics_and_tensorboard(data_root, tmp_path):
    # Batches of 6: several samples per class group, so the centred meta-gradients are not all zero.
    cfg = tiny(data_root, **{"train.batch_size": 6})
    result = fit(cfg, tmp_path / "run", progress=False)
    assert result.checkpoint_path.is_file() and result.policy_path.is_file()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert 0.0 <= lines[-1]["val/dice_rare"] <= 1.0
    assert lines[-1]["meta/steps"] == 4 and lines[-1]["nonfinite/tra"] == 0
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(result.checkpoint_path)
    assert ckpt.epoch == 2 and ckpt.label_names == {"background": 0, "organ": 1, "lesion": 2}
    policy = load_policy(result.policy_path)
    provenance = json.loads(result.policy_path.read_text())["provenance"]
    assert provenance["config_sha256"] == cfg.fingerprint()
    assert provenance["checkpoint"] == "checkpoint.pt"
    # The learned logits moved away from the initial policy, and the file carries them.
    assert not torch.allclose(policy.tra_logits, load_policy_initial(data_root).tra_logits)


def test_reinforce_estimator_learns_the_tra_policy(data_root, tmp_path):
    cfg = tiny(data_root, **{"train.batch_size": 6, "augment.tra.estimator": "reinforce", "augment.tea.learn": False})
    result = fit(cfg, tmp_path / "run", progress=False)
    assert result.metrics["meta/steps"] == 4 and result.metrics["nonfinite/tra"] == 0
    tra = load_policy(result.policy_path).tra_logits
    assert torch.isfinite(tra).all() and not torch.allclose(tra, load_policy_initial(data_root).tra_logits)


def load_policy_initial(data_root):
    from augsearch.policy.presets import policy_from_file_or_preset

    return policy_from_file_or_preset("uniform-0.1", dims=2, label_names={"background": 0, "organ": 1, "lesion": 2},
                                      patch_size=[32, 32])


def test_resume_continues_exactly_where_the_run_stopped(data_root, tmp_path):
    straight = fit(tiny(data_root), tmp_path / "straight", progress=False)
    with pytest.raises(_Stop):  # the same run, killed after its first epoch's checkpoint
        fit(tiny(data_root), tmp_path / "killed", callbacks=[_stop_after_epoch(1)], progress=False)
    resumed = fit(tiny(data_root), tmp_path / "resumed", resume=tmp_path / "killed", progress=False)
    a, b = load_checkpoint(straight.checkpoint_path), load_checkpoint(resumed.checkpoint_path)
    assert b.epoch == 2
    for key in a.model_state:
        torch.testing.assert_close(a.model_state[key], b.model_state[key], rtol=0, atol=0)
    assert a.policy["tra"] == b.policy["tra"] and a.policy["tea"] == b.policy["tea"]
    counters = ("meta/steps", "tea/steps", "meta/empty_group_updates")  # counted over the run, across the resume
    assert straight.metrics["meta/steps"] > 0 and straight.metrics["tea/steps"] > 0
    assert {k: resumed.metrics[k] for k in counters} == {k: straight.metrics[k] for k in counters}


class _Stop(Exception):
    pass


def _stop_after_epoch(epoch):
    def callback(report):
        if report.epoch == epoch:
            raise _Stop

    return callback


@pytest.mark.parametrize("mode", ["none", "fixed", "trivialaugment", "higher", "regularizers"])
def test_modes_run(data_root, tmp_path, mode):
    overrides = {
        "none": {"augment.mode": "none", "augment.tra.learn": False, "augment.tea.learn": False},
        "fixed": {"augment.policy": "nnunet", "augment.tra.learn": False, "augment.tea.learn": False},
        "trivialaugment": {"augment.policy": "trivialaugment", "augment.tra.learn": False,
                           "augment.tea.learn": False},
        "higher": {"augment.tra.backend": "higher", "train.epochs": 1},
        "regularizers": {"loss.margin": 0.5, "loss.focal_gamma": 2.0, "loss.adversarial_eps": 10.0,
                         "loss.mixup_alpha": 0.4, "loss.bg_augment_prob": 0.5, "train.epochs": 1},
    }[mode]
    result = fit(tiny(data_root, **overrides), tmp_path / mode, progress=False)
    assert result.checkpoint_path.is_file()
    assert (result.policy_path is None) == (mode == "none")
    if mode == "regularizers":  # the extra optimiser steps ran and their losses were logged
        assert all(math.isfinite(result.metrics[k]) for k in ("train/adversarial_loss", "train/mixup_loss"))
    if mode == "fixed":
        policy = load_policy(result.policy_path)
        reference = load_policy_initial(data_root)
        assert policy.tra_logits.shape == reference.tra_logits.shape


def test_tea_only_search_on_a_frozen_model_keeps_the_weights(data_root, tmp_path):
    trained = fit(tiny(data_root, **{"augment.mode": "none", "augment.tra.learn": False,
                                     "augment.tea.learn": False, "train.epochs": 1}), tmp_path / "plain",
                  progress=False)
    tea = fit(tiny(data_root, **{"train.update_model": False, "train.init_checkpoint": str(trained.checkpoint_path),
                                 "augment.tra.learn": False, "train.epochs": 1}), tmp_path / "tea", progress=False)
    before, after = load_checkpoint(trained.checkpoint_path), load_checkpoint(tea.checkpoint_path)
    for key in before.model_state:
        torch.testing.assert_close(before.model_state[key], after.model_state[key], rtol=0, atol=0)
    assert after.policy["tea"]["logits"] != load_policy_initial(data_root).tea_logits.tolist()
    # a frozen segmenter is not trained at all: no augmented training batch, no training loss
    assert "train/loss" not in tea.metrics and math.isfinite(tea.metrics["tea/loss"])


def test_bad_config_is_rejected_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[train]\nepochs = "many"\nbogus = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "train.epochs" in str(err.value) and "train.bogus" in str(err.value) and "unknown key" in str(err.value)
    assert main(["train", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", str(SMOKE), "--set", "train.patch_size=[32, 32, 32]", "--set",
                 f"data.root={tmp_path / 'missing'}", "--set", "data.synth.dims=2",
                 "--out", str(tmp_path / "run2")]) == 2
    assert "2D" in capsys.readouterr().err


def test_warmup_delays_the_first_meta_step(data_root, tmp_path):
    cfg = tiny(data_root, **{"augment.warmup_iterations": 3, "train.batch_size": 6})
    fit(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["meta/steps"] for m in lines] == [0, 1]  # 4 iterations, the first 3 under the initial policy
