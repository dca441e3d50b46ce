"""Imbalance regularisers of METHOD 7.3-7.5: adversarial perturbation, mixup, asymmetric augmentation.

Asymmetric variants act through the rare-class indicator `rare` (K,) bool; symmetric ones treat every class alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from augsearch.config import LossConfig
from augsearch.losses import (
    LOG_EPS,
    LossError,
    deep_supervision_weights,
    per_sample_soft_loss,
    soft_dice_per_class,
)

_TINY = 1e-12


def _first(output: Tensor | Sequence[Tensor]) -> Tensor:
    """Full-resolution logits of a model output (deep supervision returns a list, full resolution first)."""
    return output if isinstance(output, Tensor) else output[0]


def _generator_device(generator: torch.Generator | None, default) -> torch.device:
    """Random draws happen on the generator's device and then move to the data."""
    return generator.device if generator is not None else torch.device(default)


def _onehot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(B, *S) int64 -> (B, K, *S)."""
    return F.one_hot(labels, num_classes).movedim(-1, 1).to(dtype)


def _normalise(d: Tensor) -> Tensor:
    """Per sample: divide by max|d|, then by the L2 norm (METHOD 7.3 with the 10.13 correction); zero stays zero."""
    flat = d.flatten(1)
    flat = flat / flat.abs().amax(1, keepdim=True).clamp_min(_TINY)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(_TINY)
    return flat.reshape(d.shape)


def rare_restricted_loss(logits: Tensor, target: Tensor, classes: Tensor) -> Tensor:
    """Loss (B,) on the voxels labelled with one of `classes` (K,) bool only.

    CE with the one-hot target masked by `classes` (averaged over all voxels) plus 1 - soft Dice over foreground
    classes computed on those voxels only. Voxels of other classes do not enter, so their labels do not matter.
    """
    classes = classes.to(device=logits.device, dtype=torch.bool)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    selected = onehot * classes.reshape(1, -1, *([1] * (logits.dim() - 2))).to(logits.dtype)
    probs = torch.softmax(logits, 1)
    ce = -(selected * torch.log(probs + LOG_EPS)).sum(1).flatten(1).mean(1)
    voxel_mask = classes[target.long()]
    dice = soft_dice_per_class(probs, onehot, voxel_mask)[:, 1:].mean(1)
    return ce + 1 - dice


def adversarial_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn_rare: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    *,
    xi: float = 1e-5,
    eps: float = 10.0,
    rare: Tensor,
    asymmetric: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Supervised VAT direction r_adv (B, C, *S) for x (B, C, *S), labels y (B, *S).

    d ~ N(0, 1) normalised per sample (max|d| then L2) and scaled by xi; the gradient with respect to d of
    `loss_fn_rare(logits, y, classes)` (default `rare_restricted_loss`, per-sample values summed), with classes =
    `rare` (asymmetric) or every class (symmetric), normalised the same way and scaled by eps: every sample's r_adv
    has L2 norm eps, except samples with no voxel of the selected classes, whose direction is zero. The model's
    parameters receive no gradient; the extra optimiser step on (x + r_adv, y) is the caller's.
    """
    loss_fn_rare = loss_fn_rare or rare_restricted_loss
    d = torch.randn(
        x.shape, generator=generator, device=_generator_device(generator, x.device), dtype=x.dtype
    ).to(x.device)
    d = (xi * _normalise(d)).requires_grad_(True)
    classes = rare if asymmetric else torch.ones_like(rare, dtype=torch.bool)
    with torch.enable_grad():
        loss = loss_fn_rare(_first(model(x.detach() + d)), y, classes).sum()
        (grad,) = torch.autograd.grad(loss, d, allow_unused=True)
    if grad is None:
        return torch.zeros_like(x)
    return eps * _normalise(grad.detach())


def mixup(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    alpha: float,
    margin: float,
    rare: Tensor,
    asymmetric: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mix each sample with the batch in reversed order (METHOD 7.4).

    x (B, C, *S), y (B, *S). Per sample lambda ~ Beta(alpha, alpha) * (1 - margin); x_mix = lambda x_a +
    (1 - lambda) x_b with b = reversed batch. Asymmetric labels: where y_b is rare and y_a is not and b's weight
    1 - lambda exceeds `margin`, the a-component takes y_b; symmetrically where y_a is rare, y_b is not and lambda
    exceeds `margin`, the b-component takes y_a; two rare classes are never merged. Voxels whose resulting soft label
    is fractional are dropped (valid False). Symmetric: soft labels everywhere, valid everywhere.
    Returns x_mix (B, C, *S), soft_target (B, K, *S), valid (B, *S) bool.
    """
    if alpha <= 0:
        raise LossError(f"mixup needs alpha > 0 (loss.mixup_alpha), got {alpha}; alpha = 0 means mixup is off")
    if not 0 <= margin < 1:
        raise LossError(f"mixup margin must be in [0, 1), got {margin}")
    batch = x.shape[0]
    # Beta draws from numpy, seeded from the torch generator: no global RNG, reproducible per generator.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_generator_device(generator, "cpu")))
    lam_np = np.random.default_rng(seed).beta(alpha, alpha, size=batch) * (1 - margin)
    lam = torch.as_tensor(lam_np, dtype=x.dtype, device=x.device)
    spatial = (1,) * (x.dim() - 2)
    x_mix = lam.reshape(batch, 1, *spatial) * x + (1 - lam).reshape(batch, 1, *spatial) * x.flip(0)
    y_a, y_b = y.long(), y.long().flip(0)
    lam_v = lam.reshape(batch, *spatial)
    if asymmetric:
        rare = rare.to(device=y.device, dtype=torch.bool)
        rare_a, rare_b = rare[y_a], rare[y_b]
        a_label = torch.where(rare_b & ~rare_a & (1 - lam_v > margin), y_b, y_a)
        b_label = torch.where(rare_a & ~rare_b & (lam_v > margin), y_a, y_b)
        valid = a_label == b_label
    else:
        a_label, b_label = y_a, y_b
        valid = torch.ones_like(y_a, dtype=torch.bool)
    lam_k = lam.reshape(batch, 1, *spatial)
    soft = lam_k * _onehot(a_label, num_classes, x.dtype) + (1 - lam_k) * _onehot(b_label, num_classes, x.dtype)
    return x_mix, soft, valid


def soft_target_loss(
    logits: Tensor | Sequence[Tensor], soft_target: Tensor, valid_mask: Tensor, cfg: LossConfig, rare: Tensor
) -> Tensor:
    """Per-sample loss (B,) of the mixup step: cfg.kind with margin and focal, dropped voxels left out.

    logits (B, K, *S) or a deep-supervision list (targets resized by nearest neighbour, weights 1/2^s, lowest 0);
    soft_target (B, K, *S); valid_mask (B, *S) bool.
    """
    outputs = [logits] if isinstance(logits, Tensor) else list(logits)
    total = 0
    for weight, out in zip(deep_supervision_weights(len(outputs)), outputs, strict=True):
        if not weight:
            continue
        size = tuple(out.shape[2:])
        target, valid = soft_target, valid_mask
        if size != tuple(soft_target.shape[2:]):
            target = F.interpolate(soft_target, size=size, mode="nearest")
            valid = F.interpolate(valid_mask.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).bool()
        total = total + weight * per_sample_soft_loss(out, target, valid, cfg, rare)
    return total


def asymmetric_augment_mask(
    anchor_class: Tensor, bg_prob: float, generator: torch.Generator | None
) -> Tensor:
    """(B,) bool: which samples get augmented. Foreground-anchored always; background-anchored with bg_prob."""
    if not 0 <= bg_prob <= 1:
        raise LossError(f"bg_augment_prob must be in [0, 1], got {bg_prob}")
    device = _generator_device(generator, anchor_class.device)
    draw = torch.rand(anchor_class.shape, generator=generator, device=device).to(anchor_class.device)
    return (anchor_class != 0) | (draw < bg_prob)
