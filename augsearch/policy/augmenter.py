"""A policy's training-time augmentation as a batch transform, for a training loop of your own (MONAI, nnU-Net, ...).

The TRA of a policy is a distribution per class group: a patch centred on a foreground voxel draws its ops from the
foreground group, one centred on background from the background group. So the transform takes patches cut around
the centres your sampler chose, a margin larger than the patch the network sees (rotations and scaling read beyond
the patch), and returns the central patch, augmented as `augsearch train` augments it:

    augmenter = PolicyAugmenter(load_policy("export/policy.json"), patch_size=(64, 64, 64), labels=dataset_labels)
    # cut crops of augmenter.crop_size (patch_size + 2 * augmenter.margin) around your patch centres, then
    image, mask = augmenter(image, mask)   # (B, C, *crop_size), (B, *crop_size) -> (B, C, *patch), (B, *patch)

The class that picks a patch's group is the label at its crop's centre voxel, or `anchor_class` when given (the
class the sampler centred it on). Draws come from the augmenter's own generator: `seed` makes a sequence of calls
reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from augsearch.augment import augment_batch, required_margin
from augsearch.errors import PolicyError
from augsearch.policy.core import Policy


class PolicyAugmenter:
    """Draws each patch's ops from its class group of `policy` and applies them to (image, mask) on their device.

    patch_size: the network's patch (2 or 3 axes, the policy's dims); labels: the dataset's label name -> value,
    binding a background/foreground policy to them (None: the policy's own labels); spacing: mm per axis of the
    grid, so that rotations turn the patient on anisotropic grids (None: the voxel grid).
    """

    def __init__(self, policy: Policy, patch_size: Sequence[int], *, labels: Mapping[str, int] | None = None,
                 spacing: Sequence[float] | None = None, seed: int = 0) -> None:
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != policy.dims or min(patch) < 1:
            raise PolicyError(f"patch_size must have {policy.dims} positive extents for this {policy.dims}D policy, "
                              f"got {patch}; pass the network's patch, e.g. {(64,) * policy.dims}")
        if spacing is not None and (len(spacing) != len(patch) or min(spacing) <= 0):
            raise PolicyError(f"spacing must give {len(patch)} positive mm values (one per patch axis), got "
                              f"{tuple(spacing)}; pass None for the voxel grid")
        bound = policy.with_labels(labels) if labels is not None else policy
        self.policy = bound.with_patch_size(patch, spacing)
        self.patch_size = patch
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        # Only ops some group can draw widen the crop: a policy that never scales or rotates needs no margin.
        drawable = (self.policy.p_on().detach().cpu() > 0).any(0).tolist()
        self.margin = required_margin(patch, [op for op, on in zip(self.policy.op_names, drawable) if on], self.spacing)
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def crop_size(self) -> tuple[int, ...]:
        """Extents of the crops to pass: the patch plus `margin` voxels on every side."""
        return tuple(p + 2 * self.margin for p in self.patch_size)

    def __call__(self, image: Tensor, mask: Tensor, anchor_class: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """image (B, C, *crop_size) float, mask (B, *crop_size) integer labels, anchor_class (B,) label values
        (default: the mask at each crop's centre) -> image (B, C, *patch_size), mask (B, *patch_size) int64."""
        self._check(image, mask)
        mask = mask.long()
        if anchor_class is None:
            centre = tuple(n // 2 for n in mask.shape[1:])
            anchor_class = mask[(slice(None), *centre)]
        elif tuple(anchor_class.shape) != (image.shape[0],):
            raise PolicyError(f"anchor_class must hold one label value per patch, shape ({image.shape[0]},), got "
                              f"{tuple(anchor_class.shape)}; or leave it out to read the crops' centre voxels")
        generator = self._generator(image.device)
        self.policy.to(image.device)  # the draws use this device's generator, so the logits must live there too
        group = self.policy.group_index(anchor_class.to(image.device))
        bins = self.policy.sample_tra(group, generator)
        return augment_batch(image, mask, bins, self.policy.op_names, self.patch_size, generator=generator,
                             spacing=self.spacing)

    def _check(self, image: Tensor, mask: Tensor) -> None:
        expected = f"image (B, C, *{self.crop_size}) float and mask (B, *{self.crop_size}) labels"
        if image.dim() != len(self.patch_size) + 2 or not image.is_floating_point():
            raise PolicyError(f"expected {expected}, got image {tuple(image.shape)} {image.dtype}; add the batch and "
                              f"channel axes and convert to float")
        if tuple(mask.shape) != (image.shape[0], *image.shape[2:]) or mask.is_floating_point():
            raise PolicyError(f"expected {expected}, got mask {tuple(mask.shape)} {mask.dtype}; pass label values "
                              f"(not one-hot, no channel axis) on the image's grid")
        crop = tuple(image.shape[2:])
        if any(c < n or (c - n) % 2 for c, n in zip(crop, self.crop_size)):
            raise PolicyError(f"expected {expected}, got crops of {crop}; cut augmenter.crop_size (the patch "
                              f"{self.patch_size} plus a margin of {self.margin} voxels per side) around each centre")

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
