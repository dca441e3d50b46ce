"""Segmentation metrics on binary masks: Dice, sensitivity, precision, HD95 in millimetres; folder evaluation.

Conventions (each function returns NaN where its ratio is undefined, never raises on empty masks):
- dice = 2 TP / (2 TP + FP + FN); NaN when prediction and ground truth are both empty.
- sensitivity = TP / (TP + FN); NaN when the ground truth is empty.
- precision = TP / (TP + FP); NaN when the prediction is empty.
- hd95: surface voxels are the foreground voxels removed by one binary erosion with the face-connected structuring
  element (4-connected in 2D, 6-connected in 3D), voxels on the array border count as surface. For each surface voxel
  of one mask, its distance in mm (Euclidean, voxel spacing applied) to the nearest surface voxel of the other mask;
  hd95 is the 95th percentile (numpy linear interpolation) of the union of both directed distance sets. NaN when
  either mask is empty.
Lesion-wise detection metrics (lesions, detected, missed, false-positive components, lesion-wise Dice) come from
`augsearch.lesion_metrics`. Summaries average over cases ignoring NaN and report how many were NaN.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from augsearch.data.nifti import nifti_stem
from augsearch.errors import AugsearchError
from augsearch.lesion_metrics import LESION_METRICS, lesion_metrics

logger = logging.getLogger(__name__)

METRICS = ("dice", "sensitivity", "precision", "hd95", *LESION_METRICS)


class EvaluationError(AugsearchError):
    """Prediction and ground-truth files that cannot be compared."""


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise EvaluationError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2 TP / (2 TP + FP + FN); NaN when both masks are empty."""
    tp, fp, fn = _counts(pred, gt)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def sensitivity(pred: np.ndarray, gt: np.ndarray) -> float:
    """TP / (TP + FN); NaN when the ground truth is empty."""
    tp, _, fn = _counts(pred, gt)
    return _ratio(tp, tp + fn)


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """TP / (TP + FP); NaN when the prediction is empty."""
    tp, fp, _ = _counts(pred, gt)
    return _ratio(tp, tp + fp)


def surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour in the background or on the array border (bool, same shape)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | list[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between the surfaces of two masks; NaN if either is empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    _counts(pred, gt)
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * pred.ndim
    if len(spacing) != pred.ndim:
        raise EvaluationError(f"spacing {spacing} needs one value per axis of a {pred.ndim}D mask")
    if not pred.any() or not gt.any():
        return float("nan")
    pred_surface, gt_surface = surface(pred), surface(gt)
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[gt_surface]
    return float(np.percentile(np.concatenate([to_gt, to_pred]), 95))


def evaluate_case(
    pred_labels: np.ndarray, gt_labels: np.ndarray, spacing, label_names: dict[str, int], *,
    lesion_dilation: int = 1, min_lesion_mm3: float = 0.0,
) -> dict[str, dict[str, float]]:
    """{class name: {metric: value}} for every non-background label, on the masks `labels == value` (METRICS)."""
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise EvaluationError(f"prediction shape {pred_labels.shape} differs from ground truth {gt_labels.shape}")
    result = {}
    for name, value in sorted(label_names.items(), key=lambda item: item[1]):
        if value == 0:
            continue
        p, g = pred_labels == value, gt_labels == value
        result[name] = {
            "dice": dice(p, g),
            "sensitivity": sensitivity(p, g),
            "precision": precision(p, g),
            "hd95": hd95(p, g, spacing),
            **lesion_metrics(p, g, spacing, dilation=lesion_dilation, min_volume_mm3=min_lesion_mm3),
        }
    return result


def read_label_names(dataset_json: str | Path) -> dict[str, int]:
    """Label name -> value from a dataset.json (nnU-Net v2 `{name: value}` or MSD `{"value": name}`)."""
    path = Path(dataset_json)
    try:
        labels = json.loads(path.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvaluationError(f"{path}: expected a dataset.json with a 'labels' table ({err})") from None
    if all(str(key).isdigit() for key in labels):
        return {str(name): int(value) for value, name in labels.items()}
    return {str(name): int(value) for name, value in labels.items()}


def _case_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"{folder} is not a directory; expected a folder of NIfTI label files")
    return {stem: path for path in sorted(folder.iterdir()) if (stem := nifti_stem(path)) is not None}


def _holds_floats(path: Path) -> bool:
    """True for a NIfTI whose stored data type is floating point (read from the header only)."""
    import nibabel as nib

    return nib.load(str(path)).get_data_dtype().kind == "f"


def _read_labels(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
        raise EvaluationError(f"{path}: expected integer labels, found non-integer values")
    return data.astype(np.int64), tuple(float(z) for z in image.header.get_zooms()[: data.ndim])


def evaluate_folders(
    pred_dir: str | Path, gt_dir: str | Path, label_names: dict[str, int] | None = None, *,
    lesion_dilation: int = 1, min_lesion_mm3: float = 0.0, predicted_only: bool = False,
) -> tuple[list[dict], dict[str, dict[str, dict[str, float]]]]:
    """Compare every ground-truth NIfTI in gt_dir with the same-named file in pred_dir (`matched_cases`), then
    `evaluate_pairs`."""
    return evaluate_pairs(matched_cases(pred_dir, gt_dir, predicted_only=predicted_only), label_names,
                          lesion_dilation=lesion_dilation, min_lesion_mm3=min_lesion_mm3)


def matched_cases(pred_dir: str | Path, gt_dir: str | Path, *,
                  predicted_only: bool = False) -> dict[str, tuple[Path, Path]]:
    """case -> (prediction file, ground-truth file), in case order, from the file names alone (no volume is read).

    Every ground-truth case needs a prediction, unless predicted_only (gt_dir may then hold more, e.g. labelsTr for a
    predicted test split); a prediction without ground truth is an error either way, except floating-point maps
    (uncertainty) beside the segmentations, which are left out with a warning.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds, gts = _case_files(pred_dir), _case_files(gt_dir)
    if not gts:
        raise EvaluationError(f"ground-truth folder {gt_dir} holds no .nii/.nii.gz files; pass the folder of label "
                              "files named like the predictions (e.g. labelsTs/)")
    if not preds:
        raise EvaluationError(f"prediction folder {pred_dir} holds no .nii/.nii.gz files; pass the folder that "
                              "augsearch predict wrote")
    missing, extra = sorted(set(gts) - set(preds)), sorted(set(preds) - set(gts))
    maps = [case for case in extra if _holds_floats(preds[case])]
    if maps:
        # Uncertainty maps or probabilities beside the segmentations: not labels, so not compared.
        logger.warning("evaluate: ignored %d file(s) in %s that are not segmentations (floating-point data, e.g. "
                       "uncertainty maps): %s", len(maps), pred_dir, ", ".join(preds[c].name for c in maps))
        extra = [case for case in extra if case not in maps]
    if predicted_only:
        missing = []
        gts = {case: path for case, path in gts.items() if case in preds}
    if missing or extra:
        hint = (" (to compare only the predicted cases against a larger ground-truth folder, add --predicted-only)"
                if missing and not extra else "")
        if all(re.search(r"_\d{4}$", case) for case in gts):
            hint = f" ({gt_dir} holds image channel files, <case>_0000; pass the label folder, e.g. labelsTr/)"
        raise EvaluationError(
            f"prediction folder {pred_dir} and ground-truth folder {gt_dir} must hold the same case names; "
            f"missing predictions: {missing or 'none'}; predictions without ground truth: {extra or 'none'}{hint}"
        )
    if not gts:
        raise EvaluationError(f"prediction folder {pred_dir} holds floating-point maps only, no segmentation; pass "
                              "the folder of label files that augsearch predict wrote")
    return {case: (preds[case], gts[case]) for case in sorted(gts)}


def evaluate_pairs(
    pairs: dict[str, tuple[Path, Path]], label_names: dict[str, int] | None = None, *,
    lesion_dilation: int = 1, min_lesion_mm3: float = 0.0,
) -> tuple[list[dict], dict[str, dict[str, dict[str, float]]]]:
    """Score each case's prediction against its ground truth (PAIRS from `matched_cases`).

    Spacing comes from the ground-truth header. label_names None names each non-zero value found by its number.
    Returns rows [{case, class, dice, sensitivity, precision, hd95, lesion metrics}] and
    summary {class: {metric: {mean, std, n, nan}}} (mean/std over cases ignoring NaN, n = finite values).
    """
    cases = []
    for case, (pred_path, gt_path) in pairs.items():
        gt, spacing = _read_labels(gt_path)
        pred, _ = _read_labels(pred_path)
        if pred.shape != gt.shape:
            raise EvaluationError(
                f"case {case}: prediction {pred_path} has shape {pred.shape}, ground truth {gt_path} has "
                f"{gt.shape}; predictions must be on the ground-truth grid"
            )
        cases.append((case, pred, gt, spacing))
    if label_names is None:
        values = sorted(set().union(*(np.unique(gt).tolist() for _, _, gt, _ in cases)) - {0})
        label_names = {str(v): int(v) for v in values}
    rows = []
    for case, pred, gt, spacing in cases:
        per_class = evaluate_case(pred, gt, spacing, label_names, lesion_dilation=lesion_dilation,
                                  min_lesion_mm3=min_lesion_mm3)
        for name, metrics in per_class.items():
            rows.append({"case": case, "class": name, **metrics})
    return rows, summarise(rows)


def summarise(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{class: {metric: {mean, std, n, nan}}} over rows, NaN values left out of mean/std and counted."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name in dict.fromkeys(row["class"] for row in rows):
        summary[name] = {}
        for metric in METRICS:
            values = np.array([row[metric] for row in rows if row["class"] == name], dtype=float)
            finite = values[~np.isnan(values)]
            summary[name][metric] = {
                "mean": float(finite.mean()) if finite.size else float("nan"),
                "std": float(finite.std()) if finite.size else float("nan"),
                "n": int(finite.size),
                "nan": int(values.size - finite.size),
            }
    return summary
