"""Learning curves of one training run: whole-volume loss and Dice on the validation and the training cases.

`fit` validates with Dice only; the overfitting check of README "Budget" needs the validation loss and the
train/validation gap on the same footing. `CurveRecorder` is a `fit` callback: at every `every`-th epoch it loads the
checkpoint just written, predicts every validation and training case by sliding window (no augmentation, no TTA) and
appends one JSON line to <run>/curve.jsonl. Nothing is selected on these numbers; they only describe the run. The
training side uses the first TRAIN_CURVE_CASES training cases, so a larger training set costs no more to record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.config import ExperimentConfig
from augsearch.data.cases import load_cases
from augsearch.data.dataset import Case, read_dataset_info
from augsearch.data.preprocess import complete_preprocess
from augsearch.data.splits import resolve_splits
from augsearch.devices import resolve_device
from augsearch.metrics import dice
from augsearch.predict.sliding_window import sliding_window_predict

CURVE_NAME = "curve.jsonl"
TRAIN_CURVE_CASES = 10
EPS = 1e-6


def split_cases(cfg: ExperimentConfig) -> dict[str, list[Case]]:
    """The preprocessed training and validation cases of `cfg` (from fit's cache)."""
    info = read_dataset_info(cfg.data.root)
    splits = resolve_splits(info, cfg.data.split)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else info.root / ".augsearch_cache"
    preprocess = complete_preprocess(info, cfg.data.preprocess, cache)
    return {"train": load_cases(info, splits.train, preprocess, cache),
            "val": load_cases(info, splits.val, preprocess, cache)}


def volume_scores(model: torch.nn.Module, cases: list[Case], patch_size: list[int], labels: dict[str, int],
                  batch_size: int = 4) -> dict[str, float]:
    """Means over cases of the whole-volume loss (voxel cross-entropy + 1 - soft Dice averaged over the foreground
    labels, the training loss's two terms) and of the hard Dice per foreground label."""
    foreground = {name: value for name, value in labels.items() if value != 0}
    losses, dices = [], {name: [] for name in foreground}
    for case in cases:
        image = torch.from_numpy(case.image)[None].to(next(model.parameters()).device)
        probs = sliding_window_predict(model, image, patch_size, batch_size=batch_size)[0].cpu()  # (K, *S)
        target = torch.from_numpy(case.label.astype(np.int64))
        ce = -torch.log(probs.gather(0, target[None]).clamp_min(EPS)).mean()
        soft = [(2 * (probs[v] * (target == v)).sum() + EPS) / (probs[v].sum() + (target == v).sum() + EPS)
                for v in foreground.values()]
        losses.append(float(ce + 1 - torch.stack(soft).mean()))
        prediction = probs.argmax(0).numpy()
        for name, value in foreground.items():
            dices[name].append(dice(prediction == value, case.label == value))
    out = {"loss": float(np.mean(losses))}
    for name, values in dices.items():
        finite = [v for v in values if not math.isnan(v)]
        out[f"dice_{name}"] = float(np.mean(finite)) if finite else math.nan
    return out


class CurveRecorder:
    """`fit` callback: every `every` epochs (and at the last), scores of the current checkpoint -> curve.jsonl.

    Each line: epoch, step, train/loss (fit's mean patch loss over the epoch, augmented when the row augments),
    val_loss, val_dice_<label>, train_loss, train_dice_<label> (whole training volumes, not augmented).
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, every: int):
        self.cfg, self.path, self.every = cfg, Path(run_dir) / CURVE_NAME, every
        self.cases = split_cases(cfg)
        self.labels = dict(read_dataset_info(cfg.data.root).labels)

    def __call__(self, report) -> None:
        last = report.epoch == self.cfg.train.epochs
        if report.checkpoint_path is None or not (report.epoch % self.every == 0 or last):
            return
        model = load_checkpoint(report.checkpoint_path).build_model().to(resolve_device(self.cfg.train.device))
        line = {"epoch": report.epoch, "step": report.metrics["step"], "train/loss": report.metrics["train/loss"]}
        for split, cases in (("val", self.cases["val"]), ("train", self.cases["train"][:TRAIN_CURVE_CASES])):
            scores = volume_scores(model, cases, self.cfg.train.patch_size, self.labels,
                                   self.cfg.train.sliding_window_batch)
            line.update({f"{split}_{key}": value for key, value in scores.items()})
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")


def read_curve(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / CURVE_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summarise_curve(curve: list[dict], labels: list[str]) -> dict:
    """What README "Budget" reads from a curve: the epoch of the lowest validation loss, how far the loss rose from
    it by the end, and the train - validation Dice gap (mean over labels) at the end and at that epoch."""
    if not curve:
        return {}

    def gap(line: dict) -> float:
        return float(np.mean([line[f"train_dice_{n}"] - line[f"val_dice_{n}"] for n in labels]))

    best = min(curve, key=lambda line: line["val_loss"])
    end = curve[-1]
    return {"points": len(curve), "best_val_loss_epoch": best["epoch"], "best_val_loss": best["val_loss"],
            "final_val_loss": end["val_loss"], "val_loss_rise": end["val_loss"] - best["val_loss"],
            "final_gap_dice": gap(end), "gap_dice_at_best": gap(best),
            "final_val_dice": {n: end[f"val_dice_{n}"] for n in labels},
            "final_train_dice": {n: end[f"train_dice_{n}"] for n in labels}}
