"""Label-free Dice estimation: per-class Dice of a prediction estimated from its own calibrated probabilities.

Notation for one case: p (K, *S) the model's (TTA-averaged) probabilities, y_hat = argmax_k p its prediction,
s = p[y_hat] the voxel's confidence. Every estimator maps p to calibrated probabilities q (K, *S) and then takes the
soft Dice of q against its own prediction y_hat (y_hat always comes from p, so the estimate is for the prediction the
user gets):

    TP_c = sum_{v: y_hat=c} q_c(v)       (expected voxels of c predicted as c)
    FP_c = sum_{v: y_hat=c} 1 - q_c(v)   (expected voxels predicted c that are not c)
    FN_c = sum_{v: y_hat!=c} q_c(v)      (expected voxels of c predicted as another class)
    Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c); NaN when the denominator is 0 (as augsearch.metrics.dice).

How q is made (parameters fitted on labelled validation cases, voxels of all cases pooled):
- AC (average confidence): q = p.
- TS (temperature scaling): q = softmax(log p / T), one T > 0 fitted by minimising the NLL (torch LBFGS on log T).
  CS-TS: one temperature per predicted class, q(v) = softmax(log p(v) / T[y_hat(v)]), all fitted jointly by NLL.
- VS (vector scaling): q = softmax(w * log p + b), w, b of length K fitted by NLL.
- DoC (difference of confidences): the confidence is lowered by d, the validation gap between mean confidence and
  voxel accuracy, d = mean(s) - mean(y_hat == y); s' = clip(s - d, 0, 1). CS-DoC: d_c over the voxels predicted c
  (mean confidence minus precision of class c).
- ATC (average thresholded confidence): s' = 1 if s > t else 0, t chosen so that the fraction of validation voxels
  above t equals the validation voxel accuracy. CS-ATC: t_c over the voxels predicted c, matched to the precision of
  predicted class c.
- TS-ATC, CS-TS-ATC: ATC (CS-ATC) applied to the confidences of TS (CS-TS) calibrated probabilities.
DoC and ATC change only the confidence s -> s'; q puts s' on y_hat and spreads the remaining 1 - s' over the other
classes in proportion to their (TS-calibrated for TS-ATC) probabilities, so that FN_c is defined for every estimator.
A class-specific parameter of a class never predicted on validation falls back to the global one.

Differences from the reference package `moval` 0.3.25 (Li et al., MICCAI 2022), segmentation with metric "f1score"
(measured side by side in experiments/estimate/results.md):
- Dice formula: moval puts the calibrated confidence s' on y_hat and 0 on the other classes for every estimator, so
  FN_c = 0 and its Dice is 2 S_c / (S_c + n_c) (S_c the sum of s' over the n_c voxels predicted c). Here FN_c counts
  the expected voxels of c predicted as another class; without that term moval's global estimators overestimate.
- Fitting: moval solves every parameter numerically (scipy Nelder-Mead with restarts). Its global variants match the
  mean confidence to the voxel accuracy, as here (the global DoC gap and ATC threshold agree with ours), except TS,
  which here minimises the NLL. Its class-specific variants match, per foreground class, the case-mean estimated
  Dice to the case-mean true Dice (background keeps its initial parameter); here they match the precision of the
  predicted class in closed form (gap, quantile), which is deterministic and needs no optimiser restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from augsearch.errors import AugsearchError

ESTIMATORS = ("AC", "TS", "VS", "DoC", "ATC", "TS-ATC", "CS-TS", "CS-DoC", "CS-ATC", "CS-TS-ATC")
ESTIMATOR_VERSION = 1
_EPS = 1e-12


class EstimatorError(AugsearchError):
    """Estimator names, parameters or inputs that cannot be used."""


@dataclass(frozen=True)
class Estimator:
    """One fitted estimator. params: lists of floats keyed by name (temperature, scale, bias, gap, threshold)."""

    name: str
    num_classes: int
    params: dict[str, list[float]] = field(default_factory=dict)

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities q (K, *S) for probabilities p (K, *S) (see module docstring)."""
        p = _check_probs(probs, self.num_classes)
        pred = p.argmax(0)
        kind = self.name.removeprefix("CS-")
        if kind == "AC":
            return p
        if kind in ("TS", "TS-ATC"):
            p = _softmax(np.log(np.maximum(p, _EPS)) / _per_voxel(self.params["temperature"], pred)[None])
        elif kind == "VS":
            scale = np.asarray(self.params["scale"]).reshape((-1,) + (1,) * (p.ndim - 1))
            bias = np.asarray(self.params["bias"]).reshape(scale.shape)
            return _softmax(scale * np.log(np.maximum(p, _EPS)) + bias)
        if kind == "TS":
            return p
        s = np.take_along_axis(p, pred[None], 0)[0]
        if kind == "DoC":
            s_new = np.clip(s - _per_voxel(self.params["gap"], pred), 0.0, 1.0)
        else:
            s_new = (s > _per_voxel(self.params["threshold"], pred)).astype(p.dtype)
        return _with_confidence(p, pred, s_new)

    def estimate(self, probs: np.ndarray) -> np.ndarray:
        """Estimated Dice per class (K,) of argmax(probs) for one case's probabilities (K, *S)."""
        p = _check_probs(probs, self.num_classes)
        return soft_dice(self.calibrated(p), p.argmax(0))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "params": self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimator:
        try:
            est = cls(str(data["name"]), int(data["num_classes"]),
                      {k: [float(x) for x in v] for k, v in data.get("params", {}).items()})
        except (KeyError, TypeError, ValueError) as err:
            raise EstimatorError(f"estimator entry {data!r} is malformed ({err}); expected name, num_classes, params")
        if est.name not in ESTIMATORS:
            raise EstimatorError(f"unknown estimator {est.name!r}; expected one of {', '.join(ESTIMATORS)}")
        return est


def soft_dice(q: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Soft Dice per class (K,) of probabilities q (K, *S) against the label map pred (*S); NaN where 0/0."""
    onehot = np.eye(q.shape[0], dtype=bool)[pred].transpose((pred.ndim,) + tuple(range(pred.ndim)))
    axes = tuple(range(1, q.ndim))
    tp = np.where(onehot, q, 0.0).sum(axes)
    fp = np.where(onehot, 1.0 - q, 0.0).sum(axes)
    fn = np.where(onehot, 0.0, q).sum(axes)
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), np.nan)


def fit_estimator(name: str, probs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Estimator:
    """Fit estimator `name` on validation cases: probabilities (K, *S_i) and integer labels (*S_i) per case."""
    if name not in ESTIMATORS:
        raise EstimatorError(f"unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
    if not probs or len(probs) != len(labels):
        raise EstimatorError(f"need one label map per probability map and at least one case; got {len(probs)} "
                             f"probability maps and {len(labels)} label maps")
    k = probs[0].shape[0]
    flat_p, flat_y = [], []
    for p, y in zip(probs, labels):
        p = _check_probs(p, k)
        if y.shape != p.shape[1:]:
            raise EstimatorError(f"label shape {y.shape} does not match probability shape {p.shape[1:]}")
        flat_p.append(p.reshape(k, -1).T)
        flat_y.append(np.asarray(y).reshape(-1).astype(np.int64))
    p = np.concatenate(flat_p)  # (N, K)
    y = np.concatenate(flat_y)  # (N,)
    if y.min() < 0 or y.max() >= k:
        raise EstimatorError(f"labels range {y.min()}..{y.max()}, expected 0..{k - 1} for {k}-class probabilities")
    pred = p.argmax(1)
    specific = name.startswith("CS-")
    kind = name.removeprefix("CS-")
    params: dict[str, list[float]] = {}
    if kind in ("TS", "TS-ATC"):
        groups = pred if specific else np.zeros_like(pred)
        temperature = _fit_temperature(p, y, groups, k if specific else 1)
        params["temperature"] = temperature * k if not specific else temperature
        p = _softmax(np.log(np.maximum(p, _EPS)).T / np.asarray(params["temperature"])[pred]).T
    elif kind == "VS":
        params["scale"], params["bias"] = _fit_vector_scaling(p, y)
    s = p[np.arange(len(p)), pred]
    correct = (pred == y).astype(np.float64)
    if kind == "DoC":
        params["gap"] = _per_class(lambda m: float(s[m].mean() - correct[m].mean()), pred, k, specific)
    elif kind.endswith("ATC"):
        params["threshold"] = _per_class(lambda m: _matching_threshold(s[m], correct[m].mean()), pred, k, specific)
    return Estimator(name, k, params)


def _per_class(fit: Any, pred: np.ndarray, k: int, specific: bool) -> list[float]:
    """fit(mask) for all voxels (K copies), or per predicted class with the global value where a class is absent."""
    global_value = fit(np.ones_like(pred, dtype=bool))
    if not specific:
        return [global_value] * k
    return [fit(pred == c) if (pred == c).any() else global_value for c in range(k)]


def _matching_threshold(s: np.ndarray, accuracy: float) -> float:
    """Threshold t with mean(s > t) = accuracy (to the nearest voxel): the value below which 1 - accuracy lie."""
    below = round((1.0 - accuracy) * len(s))
    # A confidence is at least 1/K > 0, so threshold 0 counts every voxel as correct (and stays valid JSON).
    return float(np.sort(s)[below - 1]) if below > 0 else 0.0


def _fit_temperature(p: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int) -> list[float]:
    """Temperatures (n_groups,) minimising the NLL of softmax(log p / T[group]) on labels y."""
    logits = torch.from_numpy(np.log(np.maximum(p, _EPS)))
    target = torch.from_numpy(y)
    index = torch.from_numpy(groups.astype(np.int64))
    log_t = torch.zeros(n_groups, dtype=logits.dtype, requires_grad=True)
    _minimise([log_t], lambda: torch.nn.functional.cross_entropy(logits / log_t.exp()[index][:, None], target))
    return [float(t) for t in log_t.detach().exp()]


def _fit_vector_scaling(p: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Scale and bias (K,) minimising the NLL of softmax(scale * log p + bias) on labels y."""
    logits = torch.from_numpy(np.log(np.maximum(p, _EPS)))
    target = torch.from_numpy(y)
    scale = torch.ones(p.shape[1], dtype=logits.dtype, requires_grad=True)
    bias = torch.zeros(p.shape[1], dtype=logits.dtype, requires_grad=True)
    _minimise([scale, bias], lambda: torch.nn.functional.cross_entropy(logits * scale + bias, target))
    return [float(v) for v in scale.detach()], [float(v) for v in bias.detach()]


def _minimise(params: list[torch.Tensor], loss_fn: Any) -> None:
    optimiser = torch.optim.LBFGS(params, lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimiser.step(closure)


def _check_probs(probs: np.ndarray, k: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 2 or p.shape[0] != k:
        raise EstimatorError(f"probabilities of shape {p.shape}: expected (K={k}, *spatial)")
    return p


def _per_voxel(values: list[float], pred: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)[pred]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(0, keepdims=True)


def _with_confidence(p: np.ndarray, pred: np.ndarray, s_new: np.ndarray) -> np.ndarray:
    """p with confidence s_new on pred and 1 - s_new spread over the other classes in proportion to p."""
    onehot = np.eye(p.shape[0], dtype=bool)[pred].transpose((pred.ndim,) + tuple(range(pred.ndim)))
    others = np.where(onehot, 0.0, p)
    total = others.sum(0, keepdims=True)
    uniform = np.where(onehot, 0.0, 1.0 / max(p.shape[0] - 1, 1))
    share = np.where(total > _EPS, others / np.maximum(total, _EPS), uniform)
    return np.where(onehot, s_new[None], (1.0 - s_new)[None] * share)
