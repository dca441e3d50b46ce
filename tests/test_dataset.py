"""Reader, preprocessing, cache and splits on small NIfTI datasets written by the tests."""

from __future__ import annotations

import json
import os

import nibabel
import numpy as np
import pytest

from augsearch.config import PreprocessConfig, SplitConfig
from augsearch.data.cases import load_cases
from augsearch.data.dataset import dataset_fingerprint, read_dataset_info
from augsearch.data.nifti import read_image
from augsearch.data.preprocess import (
    complete_preprocess,
    normalize_image,
    restore_to_original,
)
from augsearch.data.splits import resolve_splits
from augsearch.errors import DatasetError

NONE = PreprocessConfig(normalization="none")


def _affine(spacing, origin=(10.0, -5.0, 3.0)):
    sp = list(spacing) + [1.0] * (3 - len(spacing))
    affine = np.diag(sp + [1.0])
    affine[:3, 3] = origin
    return affine


def save(path, array, spacing, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nibabel.Nifti1Image(np.asarray(array), _affine(spacing) if affine is None else affine)
    nibabel.save(img, str(path))


def write_dataset(root, meta, images: dict, labels: dict, spacing=(1.0, 1.0, 2.0)):
    """images: relative path -> array (written in imagesTr/ or imagesTs/); labels: case -> array."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for rel, arr in images.items():
        save(root / rel, arr, spacing)
    for case, arr in labels.items():
        save(root / "labelsTr" / f"{case}.nii.gz", arr.astype(np.uint8), spacing)
    return root


def _rand(rng, shape):
    return rng.normal(100.0, 20.0, shape).astype(np.float32)


@pytest.fixture
def v2_3d(tmp_path):
    """nnU-Net v2 layout, 3D, two channels as _0000/_0001 files, one test case."""
    rng = np.random.default_rng(0)
    meta = {"name": "T", "labels": {"background": 0, "liver": 1, "tumour": 2},
            "channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}
    images, labels, truth = {}, {}, {}
    for case in ("a", "b", "c", "d"):
        chans = [_rand(rng, (8, 9, 10)) for _ in range(2)]
        for c, arr in enumerate(chans):
            images[f"imagesTr/{case}_{c:04d}.nii.gz"] = arr
        labels[case] = rng.integers(0, 3, (8, 9, 10))
        truth[case] = (np.stack(chans), labels[case])
    images["imagesTs/t_0000.nii.gz"] = _rand(rng, (8, 9, 10))
    images["imagesTs/t_0001.nii.gz"] = _rand(rng, (8, 9, 10))
    return write_dataset(tmp_path / "v2", meta, images, labels), truth


def test_nnunet_v2_multichannel_3d(v2_3d):
    root, truth = v2_3d
    info = read_dataset_info(root)
    assert (info.dims, info.channel_names, info.training, info.test) == (3, ["T1", "T2"], ["a", "b", "c", "d"], ["t"])
    assert info.labels == {"background": 0, "liver": 1, "tumour": 2}
    cases = load_cases(info, ["b", "d"], NONE)
    for case in cases:
        image, label = truth[case.case_id]
        np.testing.assert_array_equal(case.image, image)
        np.testing.assert_array_equal(case.label, label)
        assert case.spacing == case.original_spacing == (1.0, 1.0, 2.0)
        assert case.original_shape == (8, 9, 10)
        np.testing.assert_allclose(case.affine, _affine((1.0, 1.0, 2.0)))
    test_case = load_cases(info, ["t"], NONE, split="Ts")[0]
    assert test_case.label is None and test_case.image.shape == (2, 8, 9, 10)


def test_msd_4d_channels_last_and_msd_labels(tmp_path):
    rng = np.random.default_rng(1)
    vol = _rand(rng, (6, 7, 5, 3))  # channels last on disk
    label = rng.integers(0, 2, (6, 7, 5))
    meta = {"labels": {"0": "background", "1": "tumour"}, "modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"},
            "tensorImageSize": "4D"}
    root = write_dataset(tmp_path / "msd", meta, {"imagesTr/BRATS_001.nii.gz": vol}, {"BRATS_001": label})
    info = read_dataset_info(root)
    assert info.labels == {"background": 0, "tumour": 1} and info.channel_names == ["FLAIR", "T1w", "T2w"]
    assert info.dims == 3 and info.training == ["BRATS_001"]
    case = load_cases(info, ["BRATS_001"], NONE)[0]
    np.testing.assert_array_equal(case.image, np.moveaxis(vol, 3, 0))
    np.testing.assert_array_equal(case.label, label)


@pytest.mark.parametrize("singleton", [True, False])
def test_2d_with_and_without_singleton_axis(tmp_path, singleton):
    rng = np.random.default_rng(2)
    image = _rand(rng, (12, 10))
    label = rng.integers(0, 2, (12, 10))
    disk = (lambda a: a[..., None]) if singleton else (lambda a: a)
    meta = {"labels": {"background": 0, "x": 1}, "channel_names": {"0": "MR"}}
    root = write_dataset(tmp_path / "d2", meta, {"imagesTr/p_0000.nii.gz": disk(image)}, {"p": disk(label)},
                         spacing=(0.5, 0.7, 3.0))
    info = read_dataset_info(root)
    assert info.dims == 2
    case = load_cases(info, ["p"], NONE)[0]
    np.testing.assert_array_equal(case.image[0], image)
    np.testing.assert_array_equal(case.label, label)
    assert case.spacing == pytest.approx((0.5, 0.7))
    arr, spacing, affine, _ = read_image(root / "imagesTr" / "p_0000.nii.gz")
    assert arr.shape == (1, 12, 10) and spacing == pytest.approx((0.5, 0.7))


def test_normalisations(v2_3d):
    root, truth = v2_3d
    info = read_dataset_info(root)
    case = load_cases(info, ["a"], PreprocessConfig(normalization="zscore"))[0]
    raw = truth["a"][0]
    expected = (raw - raw.mean(axis=(1, 2, 3), keepdims=True)) / raw.std(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(case.image, expected, rtol=1e-4, atol=1e-4)
    ct = PreprocessConfig(normalization="ct", ct_clip=[90.0, 110.0], ct_mean=100.0, ct_std=5.0)
    case = load_cases(info, ["a"], ct)[0]
    np.testing.assert_allclose(case.image, (np.clip(raw, 90, 110) - 100) / 5, rtol=1e-5, atol=1e-5)
    with pytest.raises(DatasetError, match="ct_mean"):
        normalize_image(raw, PreprocessConfig(normalization="ct"))


def test_ct_statistics_measured_on_foreground(v2_3d, tmp_path):
    root, truth = v2_3d
    info = read_dataset_info(root)
    fg = np.concatenate([truth[c][0][0][truth[c][1] > 0] for c in info.training])
    low, high = np.percentile(fg, [0.5, 99.5])
    clipped = np.clip(fg, low, high)
    cfg = complete_preprocess(info, PreprocessConfig(normalization="ct", ct_std=2.0), tmp_path / "cache")
    np.testing.assert_allclose(cfg.ct_clip, [low, high], rtol=1e-5)
    assert cfg.ct_mean == pytest.approx(clipped.mean(), rel=1e-5) and cfg.ct_std == 2.0
    case = load_cases(info, ["a"], PreprocessConfig(normalization="ct"), cache_dir=tmp_path / "cache")[0]
    expected = (np.clip(truth["a"][0], low, high) - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(case.image, expected, rtol=1e-4, atol=1e-4)


def test_resample_and_restore(tmp_path):
    # A label that varies along x and y only, constant along the anisotropic z axis: nearest round trips exactly.
    xy = np.add.outer(np.arange(8) // 3, np.arange(6) // 4) % 3
    label = np.repeat(xy[:, :, None], 5, axis=2)
    image = np.repeat(np.linspace(0, 1, 8, dtype=np.float32)[:, None, None], 6, 1).repeat(5, 2)
    meta = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "CT"}}
    root = write_dataset(tmp_path / "rs", meta, {"imagesTr/r_0000.nii.gz": image}, {"r": label},
                         spacing=(1.0, 1.0, 3.0))
    info = read_dataset_info(root)
    cfg = PreprocessConfig(normalization="none", target_spacing=[0.5, 1.0, 1.0])
    case = load_cases(info, ["r"], cfg)[0]
    assert case.image.shape == (1, 16, 6, 15) and case.label.shape == (16, 6, 15)
    assert case.spacing == (0.5, 1.0, 1.0) and case.original_spacing == (1.0, 1.0, 3.0)
    # Linear interpolation of a linear ramp along x stays linear; corners are kept.
    np.testing.assert_allclose(case.image[0, :, 0, 0], np.linspace(0, 1, 16), atol=1e-6)
    assert set(np.unique(case.label)) == {0, 1, 2}
    np.testing.assert_array_equal(restore_to_original(case.label, case), label)
    onehot = np.stack([(case.label == k) for k in range(3)]).astype(np.float32)
    prob = restore_to_original(onehot, case)
    assert prob.shape == (3, 8, 6, 5)
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(prob.argmax(0), label)


def test_cache_hit_skips_nifti_and_invalidates_on_change(v2_3d, tmp_path, monkeypatch):
    root, _ = v2_3d
    info = read_dataset_info(root)
    cfg = PreprocessConfig()
    first = load_cases(info, ["a", "c"], cfg, cache_dir=tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("NIfTI read on a cache hit")

    monkeypatch.setattr(nibabel, "load", refuse)
    second = load_cases(info, ["a", "c"], cfg, cache_dir=tmp_path / "cache")
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.label, y.label)
        assert (x.spacing, x.original_shape) == (y.spacing, y.original_shape)
        np.testing.assert_array_equal(x.affine, y.affine)
    # Different preprocessing or a touched source file is a miss, so the reader runs again.
    with pytest.raises(DatasetError, match="NIfTI read on a cache hit"):
        load_cases(info, ["a"], PreprocessConfig(normalization="none"), cache_dir=tmp_path / "cache")
    label = root / "labelsTr" / "c.nii.gz"
    st = os.stat(label)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DatasetError, match="NIfTI read on a cache hit"):
        load_cases(info, ["c"], cfg, cache_dir=tmp_path / "cache")


def test_resolve_splits(v2_3d):
    root, _ = v2_3d
    info = read_dataset_info(root)
    s = resolve_splits(info, SplitConfig(train=["a", "b"], val=["c"]))
    assert (s.train, s.val, s.test) == (["a", "b"], ["c"], [])
    s = resolve_splits(info, SplitConfig(val=["c"], test=["d"]))
    assert (s.train, s.val, s.test) == (["a", "b"], ["c"], ["d"])
    (root / "splits_final.json").write_text(json.dumps([{"train": ["a", "b", "c"], "val": ["d"]},
                                                        {"train": ["b", "c"], "val": ["a"]}]))
    s = resolve_splits(info, SplitConfig(splits_file="splits_final.json", fold=1))
    assert (s.train, s.val, s.test) == (["b", "c"], ["a"], ["d"])
    with pytest.raises(DatasetError, match="fold in 0..1"):
        resolve_splits(info, SplitConfig(splits_file="splits_final.json", fold=2))
    s1 = resolve_splits(info, SplitConfig(seed=3))
    assert len(s1.val) == 1 and sorted(s1.train + s1.val) == ["a", "b", "c", "d"] and s1.test == []
    assert resolve_splits(info, SplitConfig(seed=3)) == s1
    (root / "splits.json").write_text(json.dumps({"train": ["a", "b", "c"], "val": ["d"], "test": []}))
    s = resolve_splits(info, SplitConfig(train_fraction=0.5, seed=0))
    assert len(s.train) == 2 and set(s.train) <= {"a", "b", "c"} and s.val == ["d"]
    assert len(resolve_splits(info, SplitConfig(train_fraction=0.01)).train) == 1
    with pytest.raises(DatasetError, match=r"unknown ids \['zz'\]"):
        resolve_splits(info, SplitConfig(train=["a", "zz"], val=["b"]))


def test_fingerprint_tracks_files(v2_3d):
    root, _ = v2_3d
    info = read_dataset_info(root)
    fp = dataset_fingerprint(info)
    assert fp == dataset_fingerprint(read_dataset_info(root)) and len(fp) == 64
    save(root / "labelsTr" / "a.nii.gz", np.zeros((8, 9, 11), np.uint8), (1.0, 1.0, 2.0))
    assert dataset_fingerprint(info) != fp


# ------------------------------------------------------------------------------------------------------------------
# bad inputs: each message names the file, what was expected, what came, and a fix


def _one_case(tmp_path, image=None, label=None, label_spacing=(1.0, 1.0, 2.0)):
    rng = np.random.default_rng(5)
    image = _rand(rng, (6, 6, 4)) if image is None else image
    label = rng.integers(0, 2, (6, 6, 4)) if label is None else label
    meta = {"labels": {"background": 0, "x": 1}, "channel_names": {"0": "CT"}}
    root = write_dataset(tmp_path / "bad", meta, {"imagesTr/k_0000.nii.gz": image}, {})
    save(root / "labelsTr" / "k.nii.gz", np.asarray(label).astype(np.uint8), label_spacing)
    return root


def _expect(fn, *fragments):
    with pytest.raises(DatasetError) as info:
        fn()
    text = str(info.value)
    for fragment in ("expected", "found", "Fix:") + fragments:
        assert fragment in text, (fragment, text)


def test_errors_missing_pieces(tmp_path):
    _expect(lambda: read_dataset_info(tmp_path / "nowhere"), "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    _expect(lambda: read_dataset_info(tmp_path / "empty"), "dataset.json", "no such file")
    root = _one_case(tmp_path)
    (root / "dataset.json").write_text("{not json")
    _expect(lambda: read_dataset_info(root), "valid JSON")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0}, "channel_names": {"0": "CT"}}))
    os.rename(root / "labelsTr", root / "labelsX")
    _expect(lambda: read_dataset_info(root), "labelsTr", "no such folder")
    (root / "labelsTr").mkdir()
    _expect(lambda: read_dataset_info(root), "labelsTr/k.nii.gz", "label of training image k_0000.nii.gz")
    os.rename(root / "labelsX" / "k.nii.gz", root / "labelsTr" / "k.nii.gz")
    meta = {"labels": {"background": 0, "x": 1}, "channel_names": {"0": "CT", "1": "PET"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    _expect(lambda: read_dataset_info(root), "k_0001.nii.gz", "2 channel file(s)")
    save(root / "imagesTr" / "k_0001.nii.gz", np.zeros((6, 6, 4), np.float32), (1.0, 1.0, 2.0),
         affine=_affine((1.0, 1.0, 2.0), origin=(0.0, 0.0, 50.0)))
    _expect(lambda: load_cases(read_dataset_info(root), ["k"], NONE), "k_0001.nii.gz", "affine (origin/direction)")
    save(root / "imagesTr" / "k_0001.nii.gz", np.zeros((6, 6, 5), np.float32), (1.0, 1.0, 2.0))
    _expect(lambda: load_cases(read_dataset_info(root), ["k"], NONE), "k_0001.nii.gz", "shape (6, 6, 5)")


def test_errors_bad_contents(tmp_path):
    bad_value = np.zeros((6, 6, 4))
    bad_value[1, 2, 3] = 7
    root = _one_case(tmp_path / "v", label=bad_value)
    info = read_dataset_info(root)
    _expect(lambda: load_cases(info, ["k"], NONE), "k.nii.gz", "values [7]", "[0, 1]")
    root = _one_case(tmp_path / "s", label=np.zeros((6, 5, 4)))
    _expect(lambda: load_cases(read_dataset_info(root), ["k"], NONE), "shape of k_0000.nii.gz (6, 6, 4)",
            "shape (6, 5, 4)")
    root = _one_case(tmp_path / "p", label_spacing=(1.0, 1.0, 3.0))
    _expect(lambda: load_cases(read_dataset_info(root), ["k"], NONE), "spacing of k_0000.nii.gz (1.0, 1.0, 2.0)",
            "spacing (1.0, 1.0, 3.0)")
    nan = np.ones((6, 6, 4), np.float32)
    nan[0, 0, 0] = np.nan
    root = _one_case(tmp_path / "n", image=nan)
    _expect(lambda: load_cases(read_dataset_info(root), ["k"], NONE), "k_0000.nii.gz", "1 NaN/inf voxels")
    root = _one_case(tmp_path / "c")
    (root / "imagesTr" / "k_0000.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    _expect(lambda: load_cases(read_dataset_info(root), ["k"], NONE), "k_0000.nii.gz", "corrupt")
    _expect(lambda: load_cases(info, ["nope"], NONE), "unknown ['nope']")
