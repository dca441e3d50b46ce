"""Segmentation losses: CE + soft Dice per sample (inner loss), batch CE + Dice (outer loss), large-margin and focal.

Definitions (METHOD 4.2, 7.1, 7.2), per voxel with logits z (K,), target weights t (K,) (one-hot, or soft for mixup):

- rare-class indicator r (K,) bool. Asymmetric: the margin acts on rare classes only and focal modulation on
  frequent classes only. Symmetric: the margin acts on every class and focal modulation on every class.
- margin: z'_c = z_c - m * margin_c * t_c, q = softmax(z').
- focal factor F_c = (1 - q_c + 1e-6) ** (gamma * focal_c), focal_c = 0 for exempt (rare) classes.
- CE = -sum_c t_c F_c log(q_c + 1e-6), averaged over all voxels of the sample (voxels outside `valid` count 0).
- soft Dice over foreground classes c >= 1 with p = softmax(z) (the margin is a CE modification and does not shift
  Dice probabilities), sums over the sample's voxels inside `valid`:
  TP = sum p t, FP = sum p (1 - t), FN = sum (1 - p) t, FN_F = sum (1 - p) t F_c(p),
  loss_c = (FP + FN_F) / (2 TP + FP + FN + s), s = 1e-5, the Dice term = mean over foreground classes.
  With F = 1 this is exactly 1 - (2 TP + s) / (2 TP + FP + FN + s), nnU-Net's smoothed Dice: a class absent from
  both target and prediction scores Dice 1 (loss 0) and stays in the mean; the denominator is >= s, so gradients are
  finite for all-background patches and for patches without some class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from augsearch.config import LossConfig
from augsearch.errors import AugsearchError

SMOOTH = 1e-5
LOG_EPS = 1e-6


class LossError(AugsearchError):
    """Bad loss arguments (unknown rare label, unknown kind, shape mismatch)."""


def rare_mask(label_names: dict[str, int], rare_labels: list[str] | None, num_classes: int) -> Tensor:
    """(K,) bool: True for the classes named in `rare_labels`; None marks every foreground class (labels >= 1)."""
    values = sorted(label_names.values())
    if values and (values[0] < 0 or values[-1] >= num_classes):
        raise LossError(f"label values {values} do not fit num_classes={num_classes}; expected values in [0, K)")
    mask = torch.zeros(num_classes, dtype=torch.bool)
    if rare_labels is None:
        mask[1:] = True
        return mask
    unknown = [name for name in rare_labels if name not in label_names]
    if unknown:
        raise LossError(
            f"loss.rare_labels names {unknown}, which are not labels of this dataset; "
            f"use names from {sorted(label_names, key=label_names.get)}"
        )
    mask[[label_names[name] for name in rare_labels]] = True
    return mask


def _class_roles(cfg: LossConfig, rare: Tensor, num_classes: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(margin_classes, focal_classes) (K,) float: where the margin acts and where focal modulation acts."""
    if rare.shape != (num_classes,):
        raise LossError(f"rare must be a (K,) = ({num_classes},) bool tensor, got shape {tuple(rare.shape)}")
    rare = rare.to(device=like.device, dtype=torch.bool)
    if cfg.asymmetric:
        return rare.to(like.dtype), (~rare).to(like.dtype)
    ones = like.new_ones(num_classes)
    return ones, ones


def _expand(per_class: Tensor, dims: int) -> Tensor:
    """(K,) -> (1, K, 1, ...) for broadcasting against (B, K, *S)."""
    return per_class.reshape(1, -1, *([1] * dims))


def soft_dice_per_class(
    probs: Tensor, onehot: Tensor, mask: Tensor | None = None, *, smooth: float = SMOOTH, batch: bool = False
) -> Tensor:
    """Smoothed soft Dice (2 TP + s) / (2 TP + FP + FN + s) per class.

    probs, onehot: (B, K, *S); mask: (B, *S) or (B, 1, *S) bool/float voxel weights (None = all voxels).
    Returns (B, K), or (K,) with batch=True (sums over the whole batch).
    """
    if mask is not None:
        mask = mask.to(probs.dtype)
        if mask.dim() == probs.dim() - 1:
            mask = mask.unsqueeze(1)
        probs, onehot = probs * mask, onehot * mask
    axes = tuple(range(2, probs.dim()))
    if batch:
        axes = (0, *axes)
    tp = (probs * onehot).sum(axes)
    fp = probs.sum(axes) - tp
    fn = onehot.sum(axes) - tp
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth)


def per_sample_soft_loss(
    logits: Tensor, soft_target: Tensor, valid: Tensor | None, cfg: LossConfig, rare: Tensor
) -> Tensor:
    """Loss per sample (B,) for logits (B, K, *S) and target weights (B, K, *S) (module docstring).

    valid: (B, *S) bool, voxels that count (None = all); dropped voxels add 0 to CE and are left out of Dice.
    """
    if cfg.kind not in ("ce_dice", "ce", "dice"):
        raise LossError(f"loss kind must be 'ce_dice', 'ce' or 'dice', got {cfg.kind!r}")
    num_classes, dims = logits.shape[1], logits.dim() - 2
    if num_classes < 2:
        raise LossError(f"segmentation losses need K >= 2 classes (background + foreground), got K={num_classes}")
    if soft_target.shape != logits.shape:
        raise LossError(f"target weights {tuple(soft_target.shape)} must match logits {tuple(logits.shape)}")
    margin_classes, focal_classes = _class_roles(cfg, rare, num_classes, logits)
    soft_target = soft_target.to(logits.dtype)
    weight = None if valid is None else valid.to(logits.dtype)
    axes = tuple(range(1, dims + 1))
    total = logits.new_zeros(logits.shape[0])
    if cfg.kind in ("ce_dice", "ce"):
        shifted = logits - cfg.margin * _expand(margin_classes, dims) * soft_target if cfg.margin else logits
        q = torch.softmax(shifted, dim=1)
        term = soft_target * torch.log(q + LOG_EPS)
        if cfg.focal_gamma:
            term = term * (1 - q + LOG_EPS) ** (cfg.focal_gamma * _expand(focal_classes, dims))
        ce = -term.sum(1)
        if weight is not None:
            ce = ce * weight
        total = total + ce.mean(axes)
    if cfg.kind in ("ce_dice", "dice"):
        p = torch.softmax(logits, dim=1)[:, 1:]
        t = soft_target[:, 1:]
        if weight is not None:
            p, t = p * weight.unsqueeze(1), t * weight.unsqueeze(1)
        sum_axes = tuple(range(2, dims + 2))
        tp = (p * t).sum(sum_axes)
        fp = p.sum(sum_axes) - tp
        fn = t.sum(sum_axes) - tp
        if cfg.focal_gamma:
            # focal factor on the false-negative mass of frequent classes (METHOD 7.2); gradients flow through it.
            factor = (1 - p + LOG_EPS) ** (cfg.focal_gamma * _expand(focal_classes[1:], dims))
            fn_focal = ((t - p * t) * factor).sum(sum_axes)
        else:
            fn_focal = fn
        total = total + ((fp + fn_focal) / (2 * tp + fp + fn + SMOOTH)).mean(1)
    return total


def per_sample_loss(logits: Tensor, target: Tensor, cfg: LossConfig, rare: Tensor) -> Tensor:
    """Loss per sample (B,) for logits (B, K, *S) and integer labels target (B, *S) (cfg.kind, margin, focal)."""
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise LossError(f"target {tuple(target.shape)} must be (B, *S) matching logits {tuple(logits.shape)}")
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    return per_sample_soft_loss(logits, onehot, None, cfg, rare)


def deep_supervision_weights(count: int) -> list[float]:
    """Weights 1/2^s for outputs s = 0..count-1, the lowest resolution set to 0 (when count > 1), normalised."""
    weights = [0.5**s for s in range(count)]
    if count > 1:
        weights[-1] = 0.0
    norm = sum(weights)
    return [w / norm for w in weights]


def downsample_target(target: Tensor, shape: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of labels (B, *S) int64 to (B, *shape)."""
    if tuple(target.shape[1:]) == tuple(shape):
        return target
    return F.interpolate(target.unsqueeze(1).float(), size=tuple(shape), mode="nearest").squeeze(1).long()


def deep_supervision_loss(
    outputs: Tensor | Sequence[Tensor], target: Tensor, cfg: LossConfig, rare: Tensor
) -> Tensor:
    """Weighted per-sample loss (B,) over deep-supervision outputs [(B, K, *S), (B, K, *S/2), ...].

    The target, labels (B, *S) or soft target weights (B, K, *S) (context labels), is resized by nearest neighbour
    to each output; a single tensor is a one-output list.
    """
    if isinstance(outputs, Tensor):
        outputs = [outputs]
    soft = target.is_floating_point()
    total = 0
    for weight, out in zip(deep_supervision_weights(len(outputs)), outputs, strict=True):
        if not weight:
            continue
        if soft:
            resized = target if target.shape[2:] == out.shape[2:] else F.interpolate(target, size=out.shape[2:])
            total = total + weight * per_sample_soft_loss(out, resized, None, cfg, rare)
        else:
            total = total + weight * per_sample_loss(out, downsample_target(target, out.shape[2:]), cfg, rare)
    return total


def batch_loss(
    logits: Tensor, target: Tensor, kind: str, fg_classes: Sequence[int] | Tensor, mask: Tensor | None = None
) -> Tensor:
    """Outer (validation) loss, a scalar: CE over all voxels + (1 - mean batch soft Dice over `fg_classes`).

    logits (B, K, *S), target (B, *S) labels, kind "ce_dice" | "ce" | "dice". Batch Dice sums TP/FP/FN over the
    whole batch. mask: (B, *S) voxels that count (None = all), e.g. the valid region of a transformed view.
    """
    if kind not in ("ce_dice", "ce", "dice"):
        raise LossError(f"outer loss kind must be 'ce_dice', 'ce' or 'dice', got {kind!r}")
    fg = torch.as_tensor(fg_classes, dtype=torch.long, device=logits.device)
    if fg.numel() == 0 and kind != "ce":
        raise LossError("batch Dice needs at least one foreground class in fg_classes")
    total = logits.new_zeros(())
    if kind in ("ce_dice", "ce"):
        ce = F.cross_entropy(logits, target.long(), reduction="none")
        if mask is None:
            total = total + ce.mean()
        else:
            weight = mask.to(ce.dtype)
            total = total + (ce * weight).sum() / weight.sum().clamp_min(1)
    if kind in ("ce_dice", "dice"):
        onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        dice = soft_dice_per_class(torch.softmax(logits, 1), onehot, mask, batch=True)
        total = total + 1 - dice[fg].mean()
    return total
