"""Poly learning-rate decay shared by the segmenter, the TRA and the TEA optimisers (METHOD 4.1)."""

from __future__ import annotations

import torch


def poly_lr(base_lr: float, epoch: int, total_epochs: int, power: float = 0.9) -> float:
    """lr_t = lr_0 * (1 - t/T)^power, for epoch t in [0, T)."""
    return base_lr * (1.0 - min(epoch, total_epochs - 1) / total_epochs) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
