"""Logit-shift diagnostic: margins against an independent computation, planted statistics, the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from augsearch.cli import main
from augsearch.data.dataset import Case
from augsearch.predict.logit_margins import (
    logit_margins,
    plot_margins,
    shift_statistics,
    voxel_margins,
)

REPO = Path(__file__).resolve().parents[1]


def test_voxel_margins_hand_computed():
    # Two voxels, three classes: logits (K=3, S=2).
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0], [-1.0, 5.0]])
    label = torch.tensor([0, 1])
    # voxel 0, y=0: 2 - max(1, -1) = 1; voxel 1, y=1: 3 - max(0, 5) = -2.
    assert voxel_margins(logits, label).tolist() == [1.0, -2.0]


class _Linear(torch.nn.Module):
    """1x1 convolution with fixed weights: logits (0, v, -v) for image value v."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 1.0, -1.0]).reshape(3, 1, 1, 1))

    def forward(self, x):
        return self.conv(x)


def _cases(seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(2):
        image = rng.normal(size=(1, 20, 24)).astype(np.float32)
        label = rng.choice(3, size=(20, 24), p=[0.7, 0.25, 0.05]).astype(np.uint8)
        cases.append(Case(f"c{i}", image, label, (1.0, 1.0), (1.0, 1.0), (20, 24), np.eye(4)))
    return cases


def _expected_margins(cases: list[Case]) -> dict[int, np.ndarray]:
    """Independent numpy margins for logits (0, v, -v)."""
    out: dict[int, list[np.ndarray]] = {}
    for case in cases:
        v = case.image[0].astype(np.float64)
        per_class = {0: -np.abs(v), 1: v - np.maximum(0, -v), 2: -v - np.maximum(0, v)}
        for cls, margin in per_class.items():
            out.setdefault(cls, []).append(margin[case.label == cls])
    return {cls: np.concatenate(parts) for cls, parts in out.items()}


def test_logit_margins_match_independent_computation():
    cases = _cases()
    got = logit_margins(_Linear(), cases, [8, 8], max_voxels=10_000)
    expected = _expected_margins(cases)
    assert sorted(got) == [0, 1, 2]
    for cls in expected:
        np.testing.assert_allclose(np.sort(got[cls]), np.sort(expected[cls]), atol=1e-5)


def test_logit_margins_subsample_is_seeded_subset():
    cases = _cases()
    expected = _expected_margins(cases)
    first = logit_margins(_Linear(), cases, [8, 8], max_voxels=30, seed=3)
    again = logit_margins(_Linear(), cases, [8, 8], max_voxels=30, seed=3)
    other = logit_margins(_Linear(), cases, [8, 8], max_voxels=30, seed=4)
    for cls in expected:
        n_expected = min(30, expected[cls].size)
        assert first[cls].size == n_expected
        np.testing.assert_array_equal(first[cls], again[cls])
        # Every sampled margin is one of the class's margins (a subset, no duplicates invented).
        diffs = np.abs(first[cls][:, None] - expected[cls][None, :]).min(axis=1)
        assert diffs.max() < 1e-5
    assert not np.array_equal(np.sort(first[0]), np.sort(other[0]))


def test_shift_statistics_planted():
    train = {0: np.array([1.0, 2.0, 3.0, -1.0]), 2: np.array([2.0, 4.0])}
    unseen = {0: np.array([1.0, 1.0, -1.0, -1.0]), 2: np.array([-1.0, -3.0, 1.0]), 1: np.array([0.5])}
    stats = shift_statistics(train, unseen)
    assert sorted(stats) == [0, 1, 2]
    s0 = stats[0]
    assert s0["train_mean"] == pytest.approx(1.25)
    assert s0["train_median"] == pytest.approx(1.5)
    assert s0["train_frac_across"] == pytest.approx(0.25)
    assert s0["unseen_mean"] == pytest.approx(0.0)
    assert s0["unseen_frac_across"] == pytest.approx(0.5)
    assert s0["mean_shift"] == pytest.approx(-1.25)
    assert (s0["n_train"], s0["n_unseen"]) == (4, 4)
    s2 = stats[2]
    assert s2["train_mean"] == pytest.approx(3.0)
    assert s2["train_frac_across"] == 0.0
    assert s2["unseen_mean"] == pytest.approx(-1.0)
    assert s2["unseen_median"] == pytest.approx(-1.0)
    assert s2["unseen_frac_across"] == pytest.approx(2 / 3)
    assert s2["mean_shift"] == pytest.approx(-4.0)
    assert s2["median_shift"] == pytest.approx(-4.0)
    # A class seen on one side only: NaN on the other, counted as 0 voxels.
    s1 = stats[1]
    assert s1["n_train"] == 0 and math.isnan(s1["train_mean"]) and math.isnan(s1["mean_shift"])
    assert s1["unseen_mean"] == pytest.approx(0.5) and s1["unseen_frac_across"] == 0.0


def test_plot_margins_writes_png(tmp_path):
    out = plot_margins({0: np.array([1.0, 2.0]), 2: np.array([3.0])}, {0: np.array([-1.0, 2.0])},
                       tmp_path / "m.png", class_names={0: "background", 2: "lesion"})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from augsearch.config import load_config
    from augsearch.train import fit

    tmp = tmp_path_factory.mktemp("inspect")
    cfg = load_config(REPO / "experiments" / "smoke.toml",
                      ["train.epochs=1", "train.iterations=4", f'data.root="{tmp / "data"}"'])
    result = fit(cfg, tmp / "run", progress=False)
    return tmp, result.checkpoint_path


def test_cli_on_trained_smoke_model(smoke_run, tmp_path):
    from augsearch.artifacts.checkpoint import load_checkpoint
    from augsearch.config import PreprocessConfig, SplitConfig
    from augsearch.data.cases import load_cases
    from augsearch.data.dataset import read_dataset_info
    from augsearch.data.splits import resolve_splits

    data_dir, ckpt_path = smoke_run[0] / "data", smoke_run[1]
    png, out_json = tmp_path / "margins.png", tmp_path / "margins.json"
    rc = main(["inspect", "logits", "--model", str(ckpt_path), "--dataset", str(data_dir), "--split", "val",
               "--out", str(png), "--json", str(out_json), "--max-voxels", "300"])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out_json.read_text())
    assert report["split"] == "val" and report["compare_split"] == "train"

    # Independent recount of the voxels per class in the train and val cases the checkpoint's split config names.
    ckpt = load_checkpoint(ckpt_path)
    info = read_dataset_info(data_dir)
    splits = resolve_splits(info, SplitConfig.model_validate(ckpt.config["data"]["split"]))
    assert report["cases"] == {"train": splits.train, "unseen": splits.val}
    for side, ids in (("train", splits.train), ("unseen", splits.val)):
        labels = np.concatenate([c.label.ravel() for c in load_cases(info, ids, PreprocessConfig())])
        for name, value in info.labels.items():
            total = int(np.count_nonzero(labels == value))
            row = report["classes"][name]
            assert row[f"voxels_{side}"] == total
            assert row[f"n_{side}"] == min(total, 300)
    for row in report["classes"].values():
        assert row["mean_shift"] == pytest.approx(row["unseen_mean"] - row["train_mean"])
        assert 0.0 <= row["unseen_frac_across"] <= 1.0


def test_cli_missing_checkpoint(tmp_path, capsys):
    rc = main(["inspect", "logits", "--model", str(tmp_path / "nope.pt"), "--dataset", str(tmp_path),
               "--out", str(tmp_path / "m.png")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_cli_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": 1}, bogus)
    rc = main(["inspect", "logits", "--model", str(bogus), "--out", str(tmp_path / "m.png")])
    assert rc == 2
    assert "not an augsearch checkpoint" in capsys.readouterr().err


def test_cli_unknown_split(tmp_path, capsys):
    rc = main(["inspect", "logits", "--model", str(tmp_path / "x.pt"), "--split", "holdout",
               "--out", str(tmp_path / "m.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--split must be one of train, val, test" in err and "'holdout'" in err


def test_cli_same_split_twice(smoke_run, tmp_path, capsys):
    rc = main(["inspect", "logits", "--model", str(smoke_run[1]), "--dataset", str(smoke_run[0] / "data"),
               "--split", "train", "--out", str(tmp_path / "m.png")])
    assert rc == 2
    assert "must differ" in capsys.readouterr().err
