"""nnU-Net-like U-Net for 2D and 3D segmentation.

Each resolution level has two blocks conv(k3) -> InstanceNorm(affine) -> LeakyReLU(0.01). Downsampling is a
strided convolution (the first conv of each deeper level has stride = that level's pool kernel), as in current
nnU-Net: it learns its own downsampling and has no pooling indices, so the whole network is a plain function of its
parameters (torch.func.functional_call, jvp and vmap work; nothing runs in place; InstanceNorm keeps no running
statistics, so train and eval mode differ only in what deep supervision returns). Upsampling is a transposed
convolution with kernel = stride = the pool kernel, followed by concatenation with the skip and two blocks. A 1x1
convolution maps features to class logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from augsearch.errors import AugsearchError


class ModelInputError(AugsearchError):
    """An input whose shape the U-Net cannot process; the message says which size to use."""


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _block(dims: int, cin: int, cout: int, stride: tuple[int, ...]) -> nn.Sequential:
    """conv k3 (padding 1, given stride) -> InstanceNorm(affine, no running stats) -> LeakyReLU(0.01)."""
    return nn.Sequential(
        _CONV[dims](cin, cout, kernel_size=3, stride=stride, padding=1),
        _NORM[dims](cout, affine=True, track_running_stats=False),
        nn.LeakyReLU(0.01),
    )


def _stage(dims: int, cin: int, cout: int, stride: tuple[int, ...]) -> nn.Sequential:
    ones = (1,) * dims
    return nn.Sequential(_block(dims, cin, cout, stride), _block(dims, cout, cout, ones))


CONFIG_KEYS = (
    "dims", "in_channels", "num_classes", "base_features", "max_features", "depth", "deep_supervision", "pool_kernels"
)


class UNet(nn.Module):
    """U-Net with `depth` resolution levels (`depth - 1` downsamplings).

    Args:
        dims: 2 or 3 spatial dimensions.
        in_channels: C of the input (B, C, *S).
        num_classes: K logits per voxel.
        base_features: channels at full resolution; doubled per level, capped at `max_features`.
        depth: number of resolution levels (1 = no downsampling).
        deep_supervision: in training mode return logits of every decoder level, full resolution first.
        pool_kernels: per downsampling, one kernel per spatial axis (e.g. [[2, 2, 1], [2, 2, 2], ...] for
            anisotropic patches); None means 2 on every axis.

    forward(x (B, C, *S)) -> logits (B, K, *S); with deep supervision in training mode a list
    [(B, K, *S), (B, K, *S / p1), (B, K, *S / (p1 p2)), ...] of length depth - 1 (or [logits] when depth == 1).
    Every spatial size must be divisible by `divisor` on its axis.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        num_classes: int,
        base_features: int = 16,
        max_features: int = 320,
        depth: int = 4,
        deep_supervision: bool = False,
        pool_kernels: list[list[int]] | None = None,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ModelInputError(f"UNet dims must be 2 or 3, got {dims}")
        if depth < 1 or in_channels < 1 or num_classes < 1 or base_features < 1 or max_features < 1:
            raise ModelInputError(
                "UNet needs depth, in_channels, num_classes, base_features, max_features >= 1, got "
                f"{depth}, {in_channels}, {num_classes}, {base_features}, {max_features}"
            )
        if pool_kernels is None:
            pool_kernels = [[2] * dims for _ in range(depth - 1)]
        kernels = [tuple(int(k) for k in kernel) for kernel in pool_kernels]
        if len(kernels) != depth - 1 or any(len(k) != dims or min(k) < 1 for k in kernels):
            raise ModelInputError(
                f"pool_kernels must list depth-1 = {depth - 1} kernels of {dims} positive ints, got {pool_kernels}"
            )
        self.dims = dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.base_features = base_features
        self.max_features = max_features
        self.depth = depth
        self.deep_supervision = deep_supervision
        self.pool_kernels = kernels

        features = [min(base_features * 2**level, max_features) for level in range(depth)]
        strides = [(1,) * dims, *kernels]
        self.encoder = nn.ModuleList(
            _stage(dims, cin, cout, stride)
            for cin, cout, stride in zip([in_channels, *features[:-1]], features, strides, strict=True)
        )
        # Decoder level l (l = depth-2 ... 0) upsamples features[l+1] to level l's resolution.
        self.upsample = nn.ModuleList(
            _CONV_T[dims](features[level + 1], features[level], kernel_size=kernels[level], stride=kernels[level])
            for level in range(depth - 1)
        )
        self.decoder = nn.ModuleList(
            _stage(dims, 2 * features[level], features[level], (1,) * dims) for level in range(depth - 1)
        )
        # Heads: head[0] is the full-resolution output; heads 1.. serve deep supervision only.
        head_features = features[: max(depth - 1, 1)]
        self.heads = nn.ModuleList(_CONV[dims](f, num_classes, kernel_size=1) for f in head_features)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UNet:
        """Rebuild a UNet from `model_config(model)`; unknown keys raise ModelInputError."""
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ModelInputError(f"unknown UNet config keys {unknown}; expected a subset of {list(CONFIG_KEYS)}")
        return cls(**config)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Per spatial axis, the product of the pool kernels: every input size must be a multiple of it."""
        return tuple(math.prod(k[axis] for k in self.pool_kernels) for axis in range(self.dims))

    def min_input_size(self) -> tuple[int, ...]:
        """The smallest valid spatial size (one voxel per axis at the bottleneck)."""
        return self.divisor

    def check_input(self, x: Tensor) -> None:
        """Raise ModelInputError unless x is (B, in_channels, *S) with every S divisible by `divisor`."""
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ModelInputError(
                f"UNet expects input (B, {self.in_channels}, {', '.join('S' * self.dims)}), got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % d for s, d in zip(spatial, self.divisor, strict=True)):
            fixed = tuple(max(d, math.ceil(s / d) * d) for s, d in zip(spatial, self.divisor, strict=True))
            raise ModelInputError(
                f"UNet spatial size {spatial} is not divisible by the total pooling {self.divisor}; "
                f"use a multiple of it per axis, e.g. {fixed} (pad or choose another patch size)"
            )

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self.check_input(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outputs = []
        for level in reversed(range(self.depth - 1)):
            x = self.upsample[level](x)
            x = self.decoder[level](torch.cat([x, skips[level]], dim=1))
            if self.deep_supervision and self.training and level > 0:
                outputs.append(self.heads[level](x))
        logits = self.heads[0](x)
        if self.deep_supervision and self.training:
            return [logits, *reversed(outputs)]
        return logits


def model_config(model: UNet) -> dict[str, Any]:
    """Constructor arguments of `model` as plain JSON-able values; `UNet.from_config` rebuilds it."""
    config = {key: getattr(model, key) for key in CONFIG_KEYS}
    config["pool_kernels"] = [list(k) for k in model.pool_kernels]
    return config
