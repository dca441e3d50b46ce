"""Lesion-wise detection metrics: each connected component of a class is one lesion.

Ground-truth lesions are the connected components of the ground-truth mask (full connectivity: 8 in 2D, 26 in 3D),
labelled with scikit-image. A ground-truth lesion is detected when a predicted component overlaps it after the lesion
is dilated by `dilation` voxels (a prediction that touches a lesion's border still finds it); its lesion Dice is the
Dice between the lesion and the union of the predicted components that overlap its dilation. Predicted components
that overlap no dilated ground-truth lesion are false positives. Following the lesion-wise evaluation of the BraTS
2023 challenge, lesion-wise Dice = sum of the ground-truth lesions' Dice / (ground-truth lesions + false-positive
components): a missed lesion and a false-positive component each count as Dice 0. Ground-truth lesions smaller than
`min_volume_mm3` are ignored (neither counted nor missed), as are the predicted components that only overlap them.

Values per case and class: `lesions` (ground-truth lesions counted), `detected`, `missed`, `false_positives`,
`lesion_dice` (NaN when there is no lesion and no false positive).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.measure import label as connected_components
from skimage.morphology import dilation as grey_dilation

from augsearch.errors import AugsearchError

LESION_METRICS = ("lesions", "detected", "missed", "false_positives", "lesion_dice")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else float("nan")


def lesion_metrics(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None = None, *,
                   dilation: int = 1, min_volume_mm3: float = 0.0) -> dict[str, float]:
    """Lesion-wise counts and Dice of one class; pred and gt are boolean masks of one shape (*S)."""
    if dilation < 0 or min_volume_mm3 < 0:
        raise AugsearchError(f"lesion dilation and minimum volume must be >= 0, got {dilation} and {min_volume_mm3}")
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    voxel_mm3 = math.prod(spacing) if spacing is not None else 1.0
    gt_components = connected_components(gt, connectivity=gt.ndim)
    pred_components = connected_components(pred, connectivity=pred.ndim)
    footprint = np.ones((3,) * gt.ndim, dtype=bool)
    matched: set[int] = set()  # predicted components overlapping some dilated lesion (counted or ignored)
    dice_sum, counted, detected = 0.0, 0, 0
    for lesion_id in range(1, int(gt_components.max()) + 1):
        lesion = gt_components == lesion_id
        grown = lesion
        for _ in range(dilation):
            grown = grey_dilation(grown, footprint)
        touching = set(np.unique(pred_components[grown]).tolist()) - {0}
        matched |= touching
        if lesion.sum() * voxel_mm3 < min_volume_mm3:
            continue
        counted += 1
        if touching:
            detected += 1
            dice_sum += _dice(lesion, np.isin(pred_components, sorted(touching)))
    false_positives = int(pred_components.max()) - len(matched)
    denominator = counted + false_positives
    return {
        "lesions": float(counted),
        "detected": float(detected),
        "missed": float(counted - detected),
        "false_positives": float(false_positives),
        "lesion_dice": dice_sum / denominator if denominator else float("nan"),
    }
