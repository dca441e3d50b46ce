"""Lesion-wise detection metrics and connected-component post-processing, against hand counts."""

import math

import numpy as np
import pytest

from augsearch.errors import AugsearchError
from augsearch.lesion_metrics import lesion_metrics
from augsearch.predict.postprocess import apply_postprocess, postprocess_from_options


def _two_lesions() -> np.ndarray:
    gt = np.zeros((20, 20), dtype=bool)
    gt[2:6, 2:6] = True  # lesion A, 16 voxels
    gt[12:14, 12:14] = True  # lesion B, 4 voxels
    return gt


def test_detected_missed_and_false_positive_components():
    gt = _two_lesions()
    pred = np.zeros_like(gt)
    pred[2:6, 2:4] = True  # half of A: Dice 2*8/(8+16) = 2/3
    pred[17:19, 0:2] = True  # a false-positive component far from both
    out = lesion_metrics(pred, gt)
    assert (out["lesions"], out["detected"], out["missed"], out["false_positives"]) == (2, 1, 1, 1)
    # (2/3 + 0 for missed B) / (2 lesions + 1 false positive)
    assert out["lesion_dice"] == pytest.approx((2 / 3) / 3)


def test_a_touching_prediction_is_matched_through_the_dilation():
    gt = _two_lesions()
    pred = np.zeros_like(gt)
    pred[14, 12:14] = True  # the row just below lesion B, no overlap
    assert lesion_metrics(pred, gt, dilation=0)["false_positives"] == 1
    touching = lesion_metrics(pred, gt, dilation=1)
    assert touching["false_positives"] == 0 and touching["detected"] == 1
    assert touching["lesion_dice"] == pytest.approx(0.0 / 2)  # matched, but no overlap: Dice 0 for B, A missed


def test_small_lesions_are_ignored_by_volume_in_mm3():
    gt = _two_lesions()
    out = lesion_metrics(np.zeros_like(gt), gt, spacing=(2.0, 2.0), min_volume_mm3=20.0)  # B: 4 voxels = 16 mm^2
    assert out["lesions"] == 1 and out["missed"] == 1 and out["lesion_dice"] == 0.0


def test_no_lesion_and_no_prediction_is_undefined():
    empty = np.zeros((5, 5, 5), dtype=bool)
    assert math.isnan(lesion_metrics(empty, empty)["lesion_dice"])


def test_postprocess_drops_small_components_and_keeps_the_largest():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[0:3, 0:3, 0:3] = 1  # 27 voxels
    labels[6:8, 6:8, 6:8] = 1  # 8 voxels
    labels[5, 0, 0] = 2  # 1 voxel
    labels[9, 9, 0:2] = 2  # 2 voxels
    options = postprocess_from_options(10.0, [], {"background": 0, "a": 1, "b": 2})
    out = apply_postprocess(labels, (1.0, 1.0, 1.5), options)  # volumes 40.5, 12, 1.5 and 3 mm^3
    assert (out == 1).sum() == 35 and (out == 2).sum() == 0
    largest = apply_postprocess(labels, (1.0, 1.0, 1.0), postprocess_from_options(0.0, ["a", "2"],
                                                                                  {"background": 0, "a": 1, "b": 2}))
    assert (largest == 1).sum() == 27 and (largest == 2).sum() == 2


def test_postprocess_options_name_real_foreground_classes():
    with pytest.raises(AugsearchError, match="not a label"):
        postprocess_from_options(0.0, ["tumour"], {"background": 0, "a": 1})
    with pytest.raises(AugsearchError, match="background"):
        postprocess_from_options(0.0, ["background"], {"background": 0, "a": 1})
