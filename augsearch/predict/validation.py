"""Whole-volume validation: sliding-window prediction on each validation case, per-class metrics, their means."""

from __future__ import annotations

import math

import numpy as np
import torch

from augsearch.data.dataset import Case
from augsearch.metrics import dice, precision, sensitivity
from augsearch.predict.sliding_window import sliding_window_predict


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def validate(
    model: torch.nn.Module,
    cases: list[Case],
    *,
    patch_size: list[int],
    label_names: dict[str, int],
    rare_labels: list[str],
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Metrics over `cases` on the preprocessed grid.

    Keys: `val/dice_<label>`, `val/sensitivity_<label>`, `val/precision_<label>` (means over cases where defined),
    `val/dice_rare` (mean over the rare labels), `val/dice_mean` (mean over foreground labels). The model's
    training/eval mode is restored on return.
    """
    was_training = model.training
    model.eval()
    try:
        return _metrics(model, cases, patch_size, label_names, rare_labels, batch_size, device)
    finally:
        model.train(was_training)


def _metrics(model, cases, patch_size, label_names, rare_labels, batch_size, device) -> dict[str, float]:
    per_label: dict[str, dict[str, list[float]]] = {
        name: {"dice": [], "sensitivity": [], "precision": []} for name, value in label_names.items() if value != 0
    }
    for case in cases:
        image = torch.from_numpy(case.image).unsqueeze(0)
        probs = sliding_window_predict(model, image.to(device), patch_size, batch_size=batch_size)
        prediction = probs[0].argmax(dim=0).cpu().numpy()
        for name, scores in per_label.items():
            pred_mask = prediction == label_names[name]
            gt_mask = case.label == label_names[name]
            scores["dice"].append(dice(pred_mask, gt_mask))
            scores["sensitivity"].append(sensitivity(pred_mask, gt_mask))
            scores["precision"].append(precision(pred_mask, gt_mask))
    metrics: dict[str, float] = {}
    for name, scores in per_label.items():
        for metric, values in scores.items():
            metrics[f"val/{metric}_{name}"] = _nanmean(values)
    metrics["val/dice_rare"] = _nanmean([metrics[f"val/dice_{name}"] for name in rare_labels])
    metrics["val/dice_mean"] = _nanmean([metrics[f"val/dice_{name}"] for name in per_label])
    return metrics
