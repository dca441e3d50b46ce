"""No hidden process state: fit leaves the global RNG and thread count as it found them, validation restores the
model's mode, meta_every counts global iterations, and a preset's TEA top-k has one owner."""

import json

import pytest
import torch
from test_train import tiny

from augsearch.data.synthetic import ensure_dataset
from augsearch.learn.tea_update import tea_view_losses
from augsearch.model import UNet
from augsearch.predict.validation import validate
from augsearch.train import fit


def test_fit_leaves_the_global_rng_and_thread_count_alone(data_root, tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    fit(tiny(data_root, **{"train.num_threads": 1}), tmp_path / "run", progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_validate_restores_training_mode(data_root):
    cfg = tiny(data_root)
    ensure_dataset(cfg.data)
    from augsearch.data.cases import load_cases
    from augsearch.data.dataset import read_dataset_info
    from augsearch.data.preprocess import complete_preprocess

    info = read_dataset_info(cfg.data.root)
    cases = load_cases(info, info.training[:1], complete_preprocess(info, cfg.data.preprocess, None), None)
    model = UNet(2, 1, 3, base_features=4, depth=2).train()
    validate(model, cases, patch_size=[32, 32], label_names=info.labels, rare_labels=["lesion"], batch_size=2,
             device=torch.device("cpu"))
    assert model.training
    model.eval()
    validate(model, cases, patch_size=[32, 32], label_names=info.labels, rare_labels=["lesion"], batch_size=2,
             device=torch.device("cpu"))
    assert not model.training


def test_meta_every_counts_global_iterations(data_root, tmp_path, capsys):
    # 3 epochs of 3 iterations with a meta-step every 2 iterations: global steps 0, 2, 4, 6, 8 -> 5 meta-steps
    # (counting within each epoch would give 2 per epoch, 6 in all).
    cfg = tiny(data_root, **{"train.epochs": 3, "train.iterations": 3, "augment.meta_every": 2,
                             "train.batch_size": 6, "train.validate_every": 3})
    fit(cfg, tmp_path / "run", progress=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["meta/steps"] == 5
    # the epoch lines name a validation Dice only where one was measured (epoch 3), never 'nan'
    epochs = [line for line in capsys.readouterr().out.splitlines() if "] epoch " in line]
    assert [("val dice rare" in line) for line in epochs] == [False, False, True] and "nan" not in "".join(epochs)
    assert all(" loss " in line and " tea loss " in line for line in epochs)  # both learned here


def test_a_preset_keeps_its_own_tea_top_k(data_root, tmp_path):
    cfg = tiny(data_root, **{"augment.policy": "nnunet", "augment.tra.learn": False,
                             "augment.tea.learn": False})
    result = fit(cfg, tmp_path / "run", progress=False)
    assert len(json.loads(result.policy_path.read_text())["tea"]["selected"]) == 1


def test_an_explicit_top_k_overrides_a_preset_and_says_so(data_root, tmp_path, capsys):
    cfg = tiny(data_root, **{"augment.policy": "nnunet", "augment.tra.learn": False,
                             "augment.tea.learn": False, "augment.tea.top_k": 3})
    result = fit(cfg, tmp_path / "run", progress=True)
    assert len(json.loads(result.policy_path.read_text())["tea"]["selected"]) == 3
    assert "augment.tea.top_k = 3 replaces the policy's own top-k 1" in capsys.readouterr().out


class _Constant(torch.nn.Module):
    """Predicts class 1 everywhere, whatever the input."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 1] = 10.0
        return logits


def test_tea_view_loss_skips_classes_absent_from_the_crop():
    label = torch.zeros(1, 12, 12, dtype=torch.long)
    label[0, 3:9, 3:9] = 1  # class 1 present, class 2 absent
    image = torch.randn(1, 1, 12, 12)
    losses = tea_view_losses(_Constant(), image, label, torch.tensor([0]), [8, 8], fg_classes=[1, 2])
    # Class 1 covers 36 of the 64 central voxels and is predicted everywhere: Dice 72 / 100. An absent class 2
    # (predicted nowhere) must not pull the mean towards 1 or 0.
    assert losses[0].item() == pytest.approx(1 - 72 / 100, abs=1e-4)
