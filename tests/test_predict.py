"""`augsearch predict` on generated NIfTI volumes: geometry kept, values equal an independent pipeline, bad input."""

from __future__ import annotations

import csv
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from augsearch.artifacts.checkpoint import save_checkpoint
from augsearch.cli import main
from augsearch.config import PreprocessConfig
from augsearch.data.dataset import Case
from augsearch.data.nifti import read_image
from augsearch.data.preprocess import preprocess_image, restore_to_original
from augsearch.model import UNet, model_config
from augsearch.policy.core import ZERO_LOGIT
from augsearch.policy.init import make_policy
from augsearch.policy.io import save_policy
from augsearch.predict.files import PredictError, find_inputs, predict_files
from augsearch.predict.sliding_window import sliding_window_predict

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _checkpoint(path, dims, *, in_channels=1, target_spacing=None, patch=None, seed=0):
    torch.manual_seed(seed)
    model = UNet(dims, in_channels, len(LABELS), base_features=4, depth=2)
    preprocess = PreprocessConfig(normalization="zscore", target_spacing=target_spacing).model_dump(mode="json")
    return save_checkpoint(
        path, model=model, model_config=model_config(model), config={}, label_names=LABELS, preprocess=preprocess,
        patch_size=list(patch or (16,) * dims), epoch=1, step=1, optimizers={}, policy=None, metrics={},
        generators={}, data_fingerprint="test",
    )


def _oblique_affine(spacing, angle=0.3, origin=(-12.5, 30.0, 7.25)):
    """Rotation about z by `angle` times per-axis spacing, plus an origin: an oblique, anisotropic grid."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _write(path, data, affine, *, qform_code=1, sform_code=1):
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    nib.save(img, str(path))
    return path


def _volume(shape, seed):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = np.exp(-sum(g**2 for g in grids) * 3)
    return (100 * blob + 5 * rng.standard_normal(shape)).astype(np.float32)


def _flips_policy(path, dims, labels=LABELS):
    """Policy file with identity and the single-axis flips selected, equal weights."""
    policy = make_policy(dims, labels, tea_init="single-flips")
    names = {"identity"} | {f"flip_{a}" for a in "xyz"[:dims]}
    logits = torch.full_like(policy.tea_logits, ZERO_LOGIT)
    chosen = [e.id for e in policy.tea_entries if e.name in names]
    logits[chosen] = 0.0
    save_policy(policy.replace(tea_logits=logits, tea_top_k=len(chosen)), path)
    return path


def _reference(ckpt_path, files, dims, window):
    """Independent pipeline: read, preprocess, one sliding window, restore, argmax."""
    from augsearch.artifacts.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    image, spacing, affine, _ = read_image(files, dims)
    cfg = PreprocessConfig(**ckpt.preprocess_fields)
    pre, new_spacing = preprocess_image(image, spacing, cfg)
    probs = sliding_window_predict(ckpt.build_model(), torch.from_numpy(pre)[None], window)[0].numpy()
    case = Case("c", pre, None, tuple(new_spacing), tuple(spacing), tuple(image.shape[1:]), affine)
    return restore_to_original(probs, case).argmax(0).astype(np.uint8)


def _assert_same_geometry(out_path, in_path, shape):
    out, src = nib.load(str(out_path)), nib.load(str(in_path))
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(out.header.get_zooms()[: len(shape)], src.header.get_zooms()[: len(shape)], atol=1e-6)
    np.testing.assert_allclose(out.header.get_qform(), src.header.get_qform(), atol=1e-5)
    np.testing.assert_allclose(out.header.get_sform(), src.header.get_sform(), atol=1e-5)
    assert int(out.header["qform_code"]) == int(src.header["qform_code"])
    assert int(out.header["sform_code"]) == int(src.header["sform_code"])


def test_3d_oblique_anisotropic_odd_size_matches_independent_pipeline(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 3, target_spacing=[1.5, 1.5, 2.0])
    spacing = (1.2, 0.9, 3.1)
    (tmp_path / "in").mkdir()
    src = _write(tmp_path / "in" / "ct_001.nii.gz", _volume((27, 33, 19), 0), _oblique_affine(spacing))
    assert main(["predict", "--model", str(ckpt), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = tmp_path / "out" / "ct_001.nii.gz"
    _assert_same_geometry(out, src, (27, 33, 19))
    seg = nib.load(str(out))
    assert seg.get_data_dtype() == np.uint8
    expected = _reference(ckpt, [src], 3, (16, 16, 16))
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct_001.nii.gz"]


def test_2d_with_singleton_axis_and_sform_only(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2, patch=(16, 16))
    src = _write(tmp_path / "slice.nii", _volume((37, 21, 1), 1), _oblique_affine((0.7, 1.3, 5.0), angle=-0.5),
                 qform_code=0, sform_code=2)
    written = predict_files(ckpt, src, tmp_path / "out", device="cpu", progress=False, uncertainty=True)
    # An uncompressed input gives uncompressed outputs of the same ending (as nnU-Net writes a dataset's file_ending).
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == [
        "slice.nii", "uncertainty/slice_entropy.nii", "uncertainty/slice_variance.nii", "uncertainty/uncertainty.csv"]
    assert all(p.read_bytes()[:2] != b"\x1f\x8b" for p in written[:3])
    _assert_same_geometry(written[0], src, (37, 21, 1))
    expected = _reference(ckpt, [src], 2, (16, 16))
    np.testing.assert_array_equal(np.asarray(nib.load(str(written[0])).dataobj)[:, :, 0], expected)


def test_channel_files_grouped_and_msd_4d_give_the_same_prediction(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 3, in_channels=2)
    affine = _oblique_affine((1.0, 1.0, 2.5))
    a, b = _volume((17, 19, 18), 2), _volume((17, 19, 18), 3)
    (tmp_path / "ts").mkdir()
    _write(tmp_path / "ts" / "p1_0000.nii.gz", a, affine)
    _write(tmp_path / "ts" / "p1_0001.nii.gz", b, affine)
    _write(tmp_path / "ts" / "p2_0000.nii.gz", b, affine)
    _write(tmp_path / "ts" / "p2_0001.nii.gz", a, affine)
    found = find_inputs(tmp_path / "ts")
    assert [(c.case_id, [p.name for p in c.paths]) for c in found] == [
        ("p1", ["p1_0000.nii.gz", "p1_0001.nii.gz"]), ("p2", ["p2_0000.nii.gz", "p2_0001.nii.gz"])]
    msd = _write(tmp_path / "p1.nii.gz", np.stack([a, b], axis=-1), affine)
    predict_files(ckpt, tmp_path / "ts", tmp_path / "out_ch", device="cpu", progress=False)
    predict_files(ckpt, msd, tmp_path / "out_4d", device="cpu", progress=False)
    ch = nib.load(str(tmp_path / "out_ch" / "p1.nii.gz"))
    four = nib.load(str(tmp_path / "out_4d" / "p1.nii.gz"))
    assert four.shape == (17, 19, 18) and len(four.header.get_zooms()) == 3
    np.testing.assert_array_equal(np.asarray(ch.dataobj), np.asarray(four.dataobj))
    np.testing.assert_array_equal(np.asarray(ch.dataobj), _reference(ckpt, [tmp_path / "ts" / "p1_0000.nii.gz",
                                                                             tmp_path / "ts" / "p1_0001.nii.gz"],
                                                                   3, (16, 16, 16)))


@pytest.mark.parametrize("dims", [2, 3])
def test_uncertainty_maps_and_summary(tmp_path, dims):
    shape = (23, 29) if dims == 2 else (21, 17, 19)
    spacing = (0.8, 1.1, 2.0)[:dims] if dims == 3 else (0.8, 1.1)
    ckpt = _checkpoint(tmp_path / "ckpt.pt", dims, seed=3)
    policy = _flips_policy(tmp_path / "flips.json", dims)
    affine = np.diag([*spacing, *([1.0] * (4 - dims))])
    src = _write(tmp_path / "case7.nii.gz", _volume(shape, 4), affine)
    assert main(["predict", "--model", str(ckpt), "--policy", str(policy), "--input", str(src), "--output",
                 str(tmp_path / "out"), "--device", "cpu", "--uncertainty"]) == 0
    # Segmentations alone in the output folder (ready for evaluate), the maps and summary in uncertainty/.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case7.nii.gz", "uncertainty"]
    seg = np.asarray(nib.load(str(tmp_path / "out" / "case7.nii.gz")).dataobj)
    out = tmp_path / "out" / "uncertainty"
    assert sorted(p.name for p in out.iterdir()) == ["case7_entropy.nii.gz", "case7_variance.nii.gz", "uncertainty.csv"]
    entropy = np.asarray(nib.load(str(out / "case7_entropy.nii.gz")).dataobj)
    variance = np.asarray(nib.load(str(out / "case7_variance.nii.gz")).dataobj)
    for path in ("case7_entropy.nii.gz", "case7_variance.nii.gz"):
        _assert_same_geometry(out / path, src, shape)
    assert 0 <= entropy.min() and entropy.max() <= math.log(3) + 1e-5
    assert 0 <= variance.min() and variance.max() <= 0.25 + 1e-6
    # A random network is not flip-equivariant: the views disagree somewhere.
    assert variance.max() > 1e-6
    rows = list(csv.DictReader((out / "uncertainty.csv").open()))
    assert len(rows) == 1 and rows[0]["case"] == "case7"
    assert float(rows[0]["mean_entropy"]) == pytest.approx(float(entropy.mean()), rel=1e-4)
    voxel_ml = math.prod(spacing) / 1000
    for name, value in (("organ", 1), ("lesion", 2)):
        assert float(rows[0][f"volume_ml_{name}"]) == pytest.approx((seg == value).sum() * voxel_ml, rel=1e-6)
    assert float(rows[0]["volume_cv"]) >= 0


def test_top_k_and_logits_aggregate_run(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2)
    policy = _flips_policy(tmp_path / "flips.json", 2)
    src = _write(tmp_path / "a.nii.gz", _volume((19, 18), 5), np.eye(4))
    predict_files(ckpt, src, tmp_path / "k1", policy=policy, top_k=1, device="cpu", progress=False)
    predict_files(ckpt, src, tmp_path / "plain", device="cpu", progress=False)
    predict_files(ckpt, src, tmp_path / "logits", policy=policy, aggregate="logits", device="cpu", progress=False)
    top1 = np.asarray(nib.load(str(tmp_path / "k1" / "a.nii.gz")).dataobj)
    plain = np.asarray(nib.load(str(tmp_path / "plain" / "a.nii.gz")).dataobj)
    # Equal weights, ties broken towards the lower id: top-1 is the identity, i.e. no TTA.
    np.testing.assert_array_equal(top1, plain)
    assert (tmp_path / "logits" / "a.nii.gz").is_file()


# -- bad input: a clear error and no output ----------------------------------------------------------------------


def _run_cli(args, capsys):
    code = main(["predict", *args, "--device", "cpu"])
    return code, capsys.readouterr().err


def test_not_our_checkpoint(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    src = _write(tmp_path / "a.nii.gz", _volume((20, 20), 0), np.eye(4))
    code, err = _run_cli(["--model", str(tmp_path / "other.pt"), "--input", str(src), "--output",
                          str(tmp_path / "out")], capsys)
    assert code == 2 and "not an augsearch checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_input_not_nifti_and_missing(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2)
    (tmp_path / "notes.txt").write_text("hello")
    code, err = _run_cli(["--model", str(ckpt), "--input", str(tmp_path / "notes.txt"), "--output",
                          str(tmp_path / "out")], capsys)
    assert code == 2 and "not a NIfTI file" in err
    (tmp_path / "fake.nii.gz").write_bytes(b"not really nifti")
    code, err = _run_cli(["--model", str(ckpt), "--input", str(tmp_path / "fake.nii.gz"), "--output",
                          str(tmp_path / "out")], capsys)
    assert code == 2 and "not a readable NIfTI file" in err
    code, err = _run_cli(["--model", str(ckpt), "--input", str(tmp_path / "missing.nii.gz"), "--output",
                          str(tmp_path / "out")], capsys)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_missing_channel_file(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2, in_channels=2)
    (tmp_path / "ts").mkdir()
    _write(tmp_path / "ts" / "x_0000.nii.gz", _volume((20, 20), 0), np.eye(4))
    _write(tmp_path / "ts" / "x_0002.nii.gz", _volume((20, 20), 0), np.eye(4))
    code, err = _run_cli(["--model", str(ckpt), "--input", str(tmp_path / "ts"), "--output", str(tmp_path / "out")],
                         capsys)
    assert code == 2 and "[0, 2]" in err and "_0000 to _0001" in err
    assert not (tmp_path / "out").exists()


def test_policy_that_does_not_match_the_model(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2)
    src = _write(tmp_path / "a.nii.gz", _volume((20, 20), 0), np.eye(4))
    policy3d = _flips_policy(tmp_path / "p3.json", 3)
    code, err = _run_cli(["--model", str(ckpt), "--policy", str(policy3d), "--input", str(src), "--output",
                          str(tmp_path / "out")], capsys)
    assert code == 2 and "3D" in err and "2D" in err
    # Groups that name labels the model does not have: the file cannot be bound to the model's labels.
    other = make_policy(2, {"background": 0, "tumour": 1}, groups={"bg": ["background"], "small": ["tumour"]})
    save_policy(other, tmp_path / "other.json")
    code, err = _run_cli(["--model", str(ckpt), "--policy", str(tmp_path / "other.json"), "--input", str(src),
                          "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "tumour" in err and "lesion" in err
    code, err = _run_cli(["--model", str(ckpt), "--policy", "flips-tta", "--top-k", "99", "--input", str(src),
                          "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "top_k must be in" in err
    assert not (tmp_path / "out").exists()


def test_presets_bind_to_the_model_labels(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2)
    src = _write(tmp_path / "a.nii.gz", _volume((19, 18), 5), np.eye(4))
    predict_files(ckpt, src, tmp_path / "flips", policy="flips-tta", device="cpu", progress=False)
    predict_files(ckpt, src, tmp_path / "file", policy=_flips_policy(tmp_path / "f.json", 2, {"background": 0,
                  "foreground": 1}), device="cpu", progress=False)
    predict_files(ckpt, src, tmp_path / "identity", policy="identity", device="cpu", progress=False)
    predict_files(ckpt, src, tmp_path / "plain", device="cpu", progress=False)
    read = {name: np.asarray(nib.load(str(tmp_path / name / "a.nii.gz")).dataobj) for name in
            ("flips", "file", "identity", "plain")}
    np.testing.assert_array_equal(read["flips"], read["file"])
    np.testing.assert_array_equal(read["identity"], read["plain"])


def test_volume_smaller_than_window_is_padded_as_in_training(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2)
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in" / "a_big.nii.gz", _volume((20, 20), 0), np.eye(4))
    _write(tmp_path / "in" / "b_small.nii.gz", _volume((12, 30), 1), np.eye(4))
    assert main(["predict", "--model", str(ckpt), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "padded"), "--device", "cpu"]) == 0
    small = nib.load(str(tmp_path / "padded" / "b_small.nii.gz"))
    assert small.shape == (12, 30)
    expected = _reference(ckpt, [tmp_path / "in" / "b_small.nii.gz"], 2, (16, 16))
    np.testing.assert_array_equal(np.asarray(small.dataobj), expected)
    assert (tmp_path / "padded" / "a_big.nii.gz").is_file()


def test_failure_while_writing_leaves_no_partial_case(tmp_path, monkeypatch):
    import augsearch.predict.files as predict_module

    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2)
    src = _write(tmp_path / "a.nii.gz", _volume((20, 20), 0), np.eye(4))
    real = predict_module.atomic_open
    calls = []

    def failing_open(path, mode="wb"):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, mode)

    monkeypatch.setattr(predict_module, "atomic_open", failing_open)
    with pytest.raises(OSError, match="disk full"):
        predict_files(ckpt, src, tmp_path / "out", uncertainty=True, device="cpu", progress=False)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_find_inputs_errors(tmp_path):
    with pytest.raises(PredictError, match="does not exist"):
        find_inputs(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no NIfTI files"):
        find_inputs(tmp_path / "empty")
    _write(tmp_path / "empty" / "a.nii.gz", _volume((8, 8), 0), np.eye(4))
    with pytest.raises(PredictError, match=r"cases \['b'\] are not in"):
        find_inputs(tmp_path / "empty", cases=["b"])
