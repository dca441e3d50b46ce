"""The phantom benchmark: layout, determinism, class balance, planted shifts (and that a shift hurts a model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from augsearch.config import DataConfig, PreprocessConfig, SplitConfig, SynthConfig
from augsearch.data.cases import load_cases
from augsearch.data.check import check_dataset
from augsearch.data.dataset import read_dataset_info
from augsearch.data.sampler import PatchSampler
from augsearch.data.splits import resolve_splits
from augsearch.data.synthetic import (
    FG_SHIFT_FADE_MM,
    FG_SHIFT_REACH_MM,
    SHIFTS,
    apply_shift,
    ensure_dataset,
    generate_case,
    write_benchmark,
)
from augsearch.errors import DatasetError


def test_layout_and_dataset_json(tmp_path):
    root = write_benchmark(tmp_path / "b", dims=3, cases=6, train_cases=2, size=24, seed=1)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "organ": 1, "lesion": 2} and meta["dims"] == 3
    split = json.loads((root / "splits.json").read_text())
    assert split == {"train": ["case_000", "case_001"], "val": ["case_002", "case_003"],
                     "test": ["case_004", "case_005"]}
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == ["case_004_0000.nii.gz", "case_005_0000.nii.gz"]
    assert check_dataset(root) == []
    info = read_dataset_info(root)
    assert info.dims == 3 and len(info.training) == 6
    case = load_cases(info, ["case_000"], PreprocessConfig(normalization="none"))[0]
    assert case.image.shape == (1, 24, 24, 24) and case.spacing == (1.0, 1.0, 1.5)
    np.testing.assert_allclose(case.affine[:3, :3], np.diag([1.0, 1.0, 1.5]))
    np.testing.assert_allclose(case.affine[:3, 3], [-11.5, -11.5, -17.25])
    s = resolve_splits(info, SplitConfig())
    assert (s.train, s.val, s.test) == (split["train"], split["val"], split["test"])


def test_deterministic_bytes_and_seed_dependence(tmp_path):
    a = write_benchmark(tmp_path / "a", dims=2, cases=4, train_cases=2, size=32, seed=5, shift="gamma_up")
    b = write_benchmark(tmp_path / "b", dims=2, cases=4, train_cases=2, size=32, seed=5, shift="gamma_up")
    c = write_benchmark(tmp_path / "c", dims=2, cases=4, train_cases=2, size=32, seed=6, shift="gamma_up")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        for path in sorted((a / sub).iterdir()):
            assert path.read_bytes() == (b / sub / path.name).read_bytes()
    assert (a / "imagesTr/case_000_0000.nii.gz").read_bytes() != (c / "imagesTr/case_000_0000.nii.gz").read_bytes()


def _centroid_x(mask):
    return np.argwhere(mask)[:, 0].mean()


@pytest.mark.parametrize("dims,size", [(2, 96), (3, 48)])
def test_class_balance_and_lesion_side(dims, size):
    n_lesion = 0
    for i in range(12):
        for role in ("train", "val"):
            image, label = generate_case(i, dims=dims, size=size, seed=0, role=role, shift=None)
            assert image.dtype == np.float32 and np.isfinite(image).all()
            lesion, organ = label == 2, label == 1
            assert lesion.mean() <= 0.01 and organ.mean() > 0.01
            if i % 4 == 3:
                assert not lesion.any()
                continue
            n_lesion += 1
            # The lesion sits on the organ's +x side, and is darker than the organ on average.
            assert _centroid_x(lesion) > _centroid_x(organ)
            assert image[lesion].mean() < image[organ].mean()
    assert n_lesion == 18


def test_lesion_intensity_overlaps_background():
    """The lesion is not separable by intensity alone: background blobs cover its intensity range."""
    overlap, lesion = 0, 0
    for i in (0, 1, 2, 4, 5, 6):
        image, label = generate_case(i, dims=2, size=96, seed=0, role="train", shift=None)
        lo, hi = np.percentile(image[label == 2], [25, 75])
        bg = image[label == 0]
        overlap += ((bg > lo) & (bg < hi)).sum()
        lesion += (label == 2).sum()
    assert overlap > lesion


def test_shift_semantics():
    for i in range(4, 8):
        train, train_label = generate_case(i, dims=2, size=48, seed=2, role="train", shift=None)
        flipped, flipped_label = generate_case(i, dims=2, size=48, seed=2, role="val", shift="flip_x")
        np.testing.assert_array_equal(flipped[::-1], train)
        np.testing.assert_array_equal(flipped_label[::-1], train_label)
        rotated, _ = generate_case(i, dims=2, size=48, seed=2, role="test", shift="rot90_xy")
        np.testing.assert_array_equal(np.rot90(rotated, -1, (0, 1)), train)
        for shift, g in (("gamma_up", 0.5), ("gamma_down", 2.0)):
            shifted, label = generate_case(i, dims=2, size=48, seed=2, role="val", shift=shift)
            lo, hi = train.min(), train.max()
            np.testing.assert_allclose(shifted, lo + (hi - lo) * ((train - lo) / (hi - lo)) ** g, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(label, train_label)
        if i % 4 != 3:
            assert _centroid_x(flipped_label == 2) < _centroid_x(flipped_label == 1)
    # Without a shift, validation comes from the wider distribution: not the training case.
    wide, _ = generate_case(4, dims=2, size=48, seed=2, role="val", shift=None)
    assert not np.array_equal(wide, generate_case(4, dims=2, size=48, seed=2, role="train", shift=None)[0])
    assert set(SHIFTS) >= {"flip_x", "rot90_xy", "gamma_up", "gamma_down", "fg_gamma_up"}


def test_foreground_local_shift_brightens_around_the_labels_only():
    """fg_gamma_up equals gamma_up on and next to the labels, leaves far background untouched, fades between."""
    train, label = generate_case(4, dims=2, size=64, seed=2, role="train", shift=None)
    local, local_label = generate_case(4, dims=2, size=64, seed=2, role="val", shift="fg_gamma_up")
    everywhere, _ = generate_case(4, dims=2, size=64, seed=2, role="val", shift="gamma_up")
    np.testing.assert_array_equal(local_label, label)
    distance = ndimage.distance_transform_edt(label == 0, sampling=(1.0, 1.0))
    near, far = distance <= FG_SHIFT_REACH_MM, distance > FG_SHIFT_REACH_MM + FG_SHIFT_FADE_MM
    assert near.sum() > 0 and far.sum() > 0
    np.testing.assert_allclose(local[near], everywhere[near], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(local[far], train[far])
    fade = ~near & ~far
    assert (local[fade] >= np.minimum(train[fade], everywhere[fade]) - 1e-5).all()
    assert (local[fade] <= np.maximum(train[fade], everywhere[fade]) + 1e-5).all()


def test_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="one of"):
        write_benchmark(tmp_path / "x", dims=2, cases=6, train_cases=2, shift="flip_q")
    with pytest.raises(DatasetError, match=r"1\.\.4"):
        write_benchmark(tmp_path / "x", dims=2, cases=6, train_cases=5)
    with pytest.raises(DatasetError, match="2 or 3"):
        write_benchmark(tmp_path / "x", dims=4, cases=6, train_cases=2)
    with pytest.raises(DatasetError, match="at least 24"):
        write_benchmark(tmp_path / "x", dims=2, cases=6, train_cases=2, size=8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(DatasetError, match="non-empty"):
        write_benchmark(tmp_path / "full", dims=2, cases=6, train_cases=2)
    with pytest.raises(ValueError, match="flip_q"):
        apply_shift(np.zeros((4, 4)), np.zeros((4, 4)), "flip_q")


def test_ensure_dataset(tmp_path):
    synth = SynthConfig(dims=2, cases=5, train_cases=2, size=32, seed=3)
    cfg = DataConfig(root=str(tmp_path / "gen"), generate=True, synth=synth)
    root = ensure_dataset(cfg)
    assert (root / "dataset.json").is_file() and len(list((root / "imagesTr").iterdir())) == 5
    stamp = (root / "imagesTr" / "case_000_0000.nii.gz").stat().st_mtime_ns
    assert ensure_dataset(cfg) == root
    assert (root / "imagesTr" / "case_000_0000.nii.gz").stat().st_mtime_ns == stamp  # not regenerated
    with pytest.raises(DatasetError, match=r"data\.generate"):
        ensure_dataset(DataConfig(root=str(tmp_path / "missing")))


def test_a_mistyped_root_is_an_error_not_a_generated_dataset(tmp_path):
    """[data.synth] describes the benchmark; only data.generate = true writes it."""
    synth = SynthConfig(dims=2, cases=5, train_cases=2, size=32, seed=3)
    with pytest.raises(DatasetError) as err:
        ensure_dataset(DataConfig(root=str(tmp_path / "typo"), synth=synth))
    assert str(tmp_path / "typo" / "dataset.json") in str(err.value) and "no such folder" in str(err.value)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(ValueError, match=r"data\.synth"):
        DataConfig(root=str(tmp_path / "x"), generate=True)


def _lesion_dice(net, cases, flip_back):
    scores = []
    for case in cases:
        image, label = case.image, case.label
        if flip_back:
            image, label = np.ascontiguousarray(image[:, ::-1]), label[::-1]
        if not (label == 2).any():
            continue
        with torch.no_grad():
            pred = net(torch.from_numpy(image)[None]).argmax(1)[0].numpy() == 2
        truth = label == 2
        scores.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    return float(np.mean(scores))


@pytest.mark.slow
def test_planted_flip_hurts_a_model_trained_without_flips(tmp_path):
    """A small CNN trained on unflipped cases finds lesions on val cases flipped back, not on the shifted ones."""
    root = write_benchmark(tmp_path / "flip", dims=2, cases=20, train_cases=12, size=64, seed=0, shift="flip_x")
    info = read_dataset_info(root)
    splits = resolve_splits(info, SplitConfig())
    train = load_cases(info, splits.train, PreprocessConfig())
    val = load_cases(info, splits.val, PreprocessConfig())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers, channels = [], 1
        for dilation in (1, 2, 4, 8, 1):  # receptive field 33: a lesion's side of the organ is in view
            layers += [torch.nn.Conv2d(channels, 16, 3, padding=dilation, dilation=dilation), torch.nn.ReLU()]
            channels = 16
        net = torch.nn.Sequential(*layers, torch.nn.Conv2d(16, 3, 1))
    optimiser = torch.optim.Adam(net.parameters(), 3e-3)
    sampler = PatchSampler(train, (32, 32), fg_fraction=0.67, seed=0)
    weight = torch.tensor([1.0, 1.0, 3.0])
    for _ in range(400):
        batch = sampler.sample(16)
        loss = torch.nn.functional.cross_entropy(net(batch.image), batch.mask, weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    unshifted = _lesion_dice(net, val, flip_back=True)
    shifted = _lesion_dice(net, val, flip_back=False)
    assert unshifted > 0.4 and shifted < 0.1, (unshifted, shifted)


def test_cli_synth(tmp_path, capsys):
    from augsearch.cli import main

    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--dims", "2", "--cases", "5", "--train-cases", "2", "--size", "32",
            "--seed", "4", "--shift", "rot90_xy"]
    assert main(args) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["synth"] == {"dims": 2, "cases": 5, "train_cases": 2, "size": 32, "seed": 4, "shift": "rot90_xy"}
    assert main(args) == 2  # the folder is no longer empty
    assert "choose another --out" in capsys.readouterr().err
