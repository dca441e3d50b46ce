import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from augsearch.cli import main
from augsearch.errors import AugsearchError
from augsearch.metrics import (
    METRICS,
    dice,
    evaluate_case,
    evaluate_folders,
    hd95,
    precision,
    sensitivity,
)


def _brute_surface(mask):
    """Foreground voxels with a face neighbour outside the mask (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    outside_neighbour = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            outside_neighbour |= ~np.roll(padded, shift, axis=axis)[inner]
    return mask & outside_neighbour


def _brute_hd95(pred, gt, spacing):
    a = np.argwhere(_brute_surface(pred)) * np.asarray(spacing)
    b = np.argwhere(_brute_surface(gt)) * np.asarray(spacing)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.concatenate([pairwise.min(1), pairwise.min(0)]), 95)


def _blob(shape, rng, fill=0.3):
    from scipy import ndimage

    return ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 1.2) > 0.5 - fill * 0.1)


@pytest.mark.parametrize(
    "shape, spacing", [((17, 13), (0.7, 2.5)), ((12, 9, 7), (0.8, 1.1, 3.0)), ((6, 5, 4), (1.0, 1.0, 1.0))]
)
@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_brute_force(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    pred = rng.random(shape) > 0.6
    gt = _blob(shape, rng) | (rng.random(shape) > 0.9)
    tp, fp, fn = (pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()
    assert dice(pred, gt) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert sensitivity(pred, gt) == pytest.approx(tp / (tp + fn))
    assert precision(pred, gt) == pytest.approx(tp / (tp + fp))
    assert hd95(pred, gt, spacing) == pytest.approx(_brute_hd95(pred, gt, spacing), rel=1e-9)
    assert hd95(pred, gt, spacing) == pytest.approx(hd95(gt, pred, spacing), rel=1e-12)


def test_hd95_planted_anisotropic_shift():
    gt = np.zeros((20, 20, 10), bool)
    gt[5:15, 5:15, 3:7] = True
    pred = np.roll(gt, 1, axis=2)
    # Shift by one voxel along z (3 mm): the z faces are 3 mm off, the side walls mostly match.
    value = hd95(pred, gt, (0.5, 0.5, 3.0))
    assert value == pytest.approx(_brute_hd95(pred, gt, (0.5, 0.5, 3.0)))
    assert value == pytest.approx(3.0)
    assert hd95(gt, gt, (0.5, 0.5, 3.0)) == 0.0


def test_empty_mask_conventions():
    empty, full = np.zeros((4, 5), bool), np.zeros((4, 5), bool)
    full[1:3, 1:4] = True
    assert math.isnan(dice(empty, empty))
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert math.isnan(sensitivity(full, empty)) and sensitivity(empty, full) == 0.0
    assert math.isnan(precision(empty, full)) and precision(full, empty) == 0.0
    for a, b in ((empty, empty), (full, empty), (empty, full)):
        assert math.isnan(hd95(a, b, (1.0, 2.0)))
    with pytest.raises(AugsearchError, match="shape"):
        dice(full, np.zeros((5, 4), bool))


def test_evaluate_case_per_class():
    gt = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[0, 1, 0], [2, 0, 0]])
    result = evaluate_case(pred, gt, (1.0, 1.0), {"background": 0, "a": 1, "b": 2, "c": 3})
    assert list(result) == ["a", "b", "c"]
    assert result["a"]["dice"] == pytest.approx(2 / 3) and result["a"]["precision"] == 1.0
    assert result["b"]["sensitivity"] == pytest.approx(0.5)
    assert all(math.isnan(result["c"][k]) for k in ("dice", "sensitivity", "precision", "hd95", "lesion_dice"))
    assert result["c"]["lesions"] == result["c"]["false_positives"] == 0
    assert (result["b"]["lesions"], result["b"]["detected"], result["b"]["lesion_dice"]) == (1, 1, pytest.approx(2 / 3))


def _write(folder, name, data, zooms):
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data.astype(np.uint8), np.diag([*zooms, 1.0]))
    nib.save(image, str(folder / f"{name}.nii.gz"))


def _folders(tmp_path):
    rng = np.random.default_rng(0)
    gt_dir, a_dir, b_dir = tmp_path / "gt", tmp_path / "plain", tmp_path / "tta"
    truth = {}
    for i in range(3):
        gt = np.zeros((10, 8, 6), np.uint8)
        gt[2:7, 2:6, 1:5] = 1
        if i != 2:
            gt[3:5, 3:5, 2:4] = 2
        truth[f"case_{i}"] = gt
        _write(gt_dir, f"case_{i}", gt, (1.0, 1.5, 2.0))
        noisy = np.where(rng.random(gt.shape) > 0.9, 0, gt)
        _write(a_dir, f"case_{i}", noisy, (1.0, 1.5, 2.0))
        _write(b_dir, f"case_{i}", gt, (1.0, 1.5, 2.0))
    return gt_dir, a_dir, b_dir, truth


def test_evaluate_folders_rows_summary_and_errors(tmp_path):
    gt_dir, a_dir, b_dir, truth = _folders(tmp_path)
    rows, summary = evaluate_folders(b_dir, gt_dir, {"background": 0, "kidney": 1, "tumour": 2})
    assert len(rows) == 6
    assert summary["kidney"]["dice"] == {"mean": 1.0, "std": 0.0, "n": 3, "nan": 0}
    # case_2 has no tumour in either mask: Dice and HD95 undefined there, counted as NaN.
    assert summary["tumour"]["dice"]["nan"] == 1 and summary["tumour"]["hd95"]["mean"] == 0.0
    rows_a, _ = evaluate_folders(a_dir, gt_dir)
    assert {row["class"] for row in rows_a} == {"1", "2"}
    (a_dir / "case_0.nii.gz").unlink()
    _write(a_dir, "stray", truth["case_1"], (1.0, 1.5, 2.0))
    with pytest.raises(AugsearchError, match=r"missing predictions: \['case_0'\].*\['stray'\]"):
        evaluate_folders(a_dir, gt_dir)
    _write(b_dir, "case_1", np.zeros((10, 8, 5)), (1.0, 1.5, 2.0))
    with pytest.raises(AugsearchError, match="case_1.*shape"):
        evaluate_folders(b_dir, gt_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AugsearchError, match=r"ground-truth folder .*empty holds no .*labelsTs"):
        evaluate_folders(b_dir, tmp_path / "empty")


def test_evaluate_cli_side_by_side(tmp_path, capsys):
    gt_dir, a_dir, b_dir, _ = _folders(tmp_path)
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "tumour": 2}}))
    out = tmp_path / "res" / "eval.csv"
    code = main(["evaluate", "--pred", str(a_dir), "--pred", str(b_dir), "--gt", str(gt_dir),
                 "--labels", str(labels), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header == ["class", "metric", "plain", "tta"]
    assert any(line.startswith("tumour") and "hd95" in line and "(1 NaN)" in line for line in printed.splitlines())
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and rows[0].keys() == {"prediction", "case", "class", *METRICS}
    tta_kidney = [float(r["dice"]) for r in rows if r["prediction"] == "tta" and r["class"] == "kidney"]
    assert tta_kidney == [1.0, 1.0, 1.0]
    assert main(["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(gt_dir)]) == 2


def test_evaluate_predicted_only_compares_a_subset_of_the_ground_truth(tmp_path, capsys):
    gt_dir, a_dir, b_dir, truth = _folders(tmp_path)
    (b_dir / "case_0.nii.gz").unlink()
    with pytest.raises(AugsearchError, match=r"missing predictions: \['case_0'\].*add --predicted-only"):
        evaluate_folders(b_dir, gt_dir)
    rows, summary = evaluate_folders(b_dir, gt_dir, predicted_only=True)
    assert sorted({row["case"] for row in rows}) == ["case_1", "case_2"]
    assert summary["1"]["dice"]["n"] == 2
    # A prediction without ground truth stays an error, and so does a prediction folder with no case.
    _write(b_dir, "stray", truth["case_1"], (1.0, 1.5, 2.0))
    with pytest.raises(AugsearchError, match=r"without ground truth: \['stray'\]"):
        evaluate_folders(b_dir, gt_dir, predicted_only=True)
    # The image folder given as ground truth: its <case>_0000 names match no prediction.
    images = tmp_path / "imagesTr"
    for case in truth:
        _write(images, f"{case}_0000", truth[case], (1.0, 1.5, 2.0))
    with pytest.raises(AugsearchError, match=r"imagesTr holds image channel files, <case>_0000; pass the label folder"):
        evaluate_folders(b_dir, images)
    (tmp_path / "none").mkdir()
    with pytest.raises(AugsearchError, match=r"prediction folder .*none holds no .nii/.nii.gz files"):
        evaluate_folders(tmp_path / "none", gt_dir, predicted_only=True)
    nib.save(nib.Nifti1Image(np.full((10, 8, 6), 0.5, np.float32), np.eye(4)),
             str(tmp_path / "none" / "case_0_uncertainty.nii.gz"))
    with pytest.raises(AugsearchError, match="floating-point maps only"):
        evaluate_folders(tmp_path / "none", gt_dir, predicted_only=True)
    (b_dir / "stray.nii.gz").unlink()
    # Side by side, folders covering different cases would not be comparable columns.
    assert main(["evaluate", "--predicted-only", "--pred", str(a_dir), "--pred", str(b_dir), "--gt", str(gt_dir)]) == 2
    assert "hold different cases (only in plain: ['case_0']; only in tta: none)" in capsys.readouterr().err
    (a_dir / "case_0.nii.gz").unlink()
    assert main(["evaluate", "--predicted-only", "--pred", str(a_dir), "--pred", str(b_dir), "--gt", str(gt_dir)]) == 0
