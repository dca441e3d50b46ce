"""The TEA step (METHOD 4.2 B): transformed views of validation crops, mapped back onto the crop's grid, and the
per-view loss whose gradient moves the TEA logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from augsearch.ops.spatial import centre_crop
from augsearch.ops.tea import tea_apply, tea_invert


def tea_apply_mask(mask: Tensor, ids: Tensor, num_classes: int, spatial: Tensor,
                   spacing: Sequence[float] | None = None) -> Tensor:
    """Move label maps (B, *S) along with TEA views: spatial entries warp the one-hot map (linear, then argmax);
    intensity entries leave the label untouched. `spatial` is a (A,) bool table over pool ids; spacing as in
    `tea_apply`."""
    dims = mask.ndim - 1
    onehot = F.one_hot(mask, num_classes).movedim(-1, 1).float()
    warped = tea_apply(onehot, ids, dims, spacing=spacing).argmax(dim=1)
    return torch.where(spatial[ids].view(-1, *([1] * dims)), warped, mask)


def tea_view_losses(
    model: torch.nn.Module,
    image: Tensor,
    label: Tensor,
    ids: Tensor,
    patch_size: list[int],
    fg_classes: list[int],
    spacing: Sequence[float] | None = None,
) -> Tensor:
    """Soft-Dice loss of each TEA view of one validation crop, mapped back onto the original grid (METHOD 4.2 B).

    image: (1, C, *E) enlarged crop; label: (1, *E); ids: (Z,) pool ids. The network sees the central patch of each
    transformed crop; its probabilities are padded back to the crop, inverted, and compared with the untransformed
    label on the central patch, only where the inverted view has support; rotations turn the patient on a grid of
    `spacing` mm. The Dice is averaged over the foreground classes present in the crop's central patch (an absent
    class says nothing about a view); a crop without any gives zero losses. Returns (Z,) losses, no autograd graph.
    """
    dims = len(patch_size)
    z = ids.numel()
    with torch.no_grad():
        views = tea_apply(image.expand(z, *image.shape[1:]), ids, dims, spacing=spacing)
        probs = torch.softmax(model(centre_crop(views, patch_size)), dim=1)
        support = torch.ones_like(probs[:, :1])
        pad = []
        for axis in reversed(range(dims)):
            total = image.shape[2 + axis] - patch_size[axis]
            pad += [total // 2, total - total // 2]
        padded = F.pad(torch.cat([probs, support], dim=1), pad)
        inverted, valid = tea_invert(padded, ids, dims, spacing=spacing)
        inverted = centre_crop(inverted, patch_size)
        mask = centre_crop(valid, patch_size) & (inverted[:, -1:] > 0.999)
        probs_back = inverted[:, :-1] * mask
        target = F.one_hot(centre_crop(label, patch_size), probs.shape[1]).movedim(-1, 1).float()
        target = target.expand(z, *target.shape[1:]) * mask
        reduce = tuple(range(2, 2 + dims))
        intersection = (probs_back * target).sum(reduce)
        denominator = probs_back.sum(reduce) + target.sum(reduce)
        dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
        present = target[:1].sum(reduce)[0, fg_classes] > 0  # (F,) classes in the crop
        if not bool(present.any()):
            return torch.zeros(z, device=image.device)
        return 1.0 - dice[:, fg_classes][:, present].mean(dim=1)
