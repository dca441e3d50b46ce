"""Intensity ops: gamma, inverse gamma, shift, scale, contrast, blur/sharpen, noise, low resolution.

They act on images only (labels pass through) and invert to the identity. Per-sample params are applied in one
batched pass; samples with identity params are returned bitwise unchanged (`torch.where`, no host sync).

Image-level statistics `stats` (N, C, 4) = (min, max, mean, std) come from the whole image when the caller has them
(`augment_batch(image_stats=...)`) and otherwise from the patch itself:
- gamma maps intensities from [min, max] of image and patch to [0, 1], applies the power, maps back, then restores the
  mean and std that the patch had before (only the patch is at hand after the power, so the mean/std correction is
  patch-level, while the range is image-level);
- contrast scales around the image mean and clips to the image [min, max]; sharpen clips to the image [min, max].
Noise is counter-based: each sample's N(0, 1) field is a hash of (seed param, voxel index), so the same params give
the same noise on any device and no generator state is consumed at apply time.

kornia supplies the Gaussian kernels (`get_gaussian_kernel1d`, one sigma per sample) and the power law
(`kornia.enhance.adjust_gamma`). Ours where kornia lacks the capability: the separable 3D blur (kornia's
`filter3d` takes a full 3D kernel, 9^3 taps against 3 x 9), the Laplacian of the sharpen (kornia's is 2D only, with
an 8-neighbour kernel that would make the 2D and 3D ops differ), the per-sample low-resolution zoom, the
counter-based noise, and the image-level range and mean/std bookkeeping around gamma and contrast.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_gamma
from kornia.filters import get_gaussian_kernel1d

from augsearch.ops.base import Op, OpInputError, OpSpec, spatial_view

BLUR_RADIUS = 4  # kernel half-width in voxels; covers 3 sigma of the largest sigma (1.0 + margin)


def image_statistics(x: torch.Tensor) -> torch.Tensor:
    """(min, max, mean, std) per sample and channel: x (N, C, *S) -> (N, C, 4)."""
    flat = x.flatten(2)
    return torch.stack([flat.amin(-1), flat.amax(-1), flat.mean(-1), flat.std(-1, correction=0)], dim=-1)


def _stats(x: torch.Tensor, stats: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """min, max, mean, std each (N, C, 1, ..., 1)."""
    if stats is None:
        stats = image_statistics(x)
    if stats.shape != x.shape[:2] + (4,):
        raise OpInputError(f"image stats must have shape (N, C, 4) = {tuple(x.shape[:2]) + (4,)}, got "
                           f"{tuple(stats.shape)}; pass (min, max, mean, std) per sample and channel")
    view = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
    return tuple(stats[..., i].to(x.dtype).reshape(view) for i in range(4))


def _where(active: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(active.view(spatial_view(x)), out, x)


def _check_image(op: Op, x: torch.Tensor, target: str) -> None:
    if target not in ("image", "mask"):
        raise OpInputError(f"target must be 'image' or 'mask', got {target!r}")
    if target == "image" and not x.is_floating_point():
        raise OpInputError(f"{op.name}: expected a float image (N, C, *S), got {x.dtype}")


def gamma_transform(x: torch.Tensor, gamma: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
    """x (N, C, *S), gamma (N,) -> power law on the image-level range, patch mean/std restored."""
    lo, hi, _, _ = _stats(x, stats)
    flat = x.flatten(2)
    lo = torch.minimum(lo, flat.amin(-1).view_as(lo))
    hi = torch.maximum(hi, flat.amax(-1).view_as(hi))
    span = (hi - lo).clamp_min(1e-8)
    y = adjust_gamma(((x - lo) / span).clamp(0, 1), gamma.to(x.dtype)) * span + lo
    mean, std = flat.mean(-1).view_as(lo), flat.std(-1, correction=0).view_as(lo)
    y_flat = y.flatten(2)
    y_mean, y_std = y_flat.mean(-1).view_as(lo), y_flat.std(-1, correction=0).view_as(lo)
    return (y - y_mean) / y_std.clamp_min(1e-8) * std + mean


def _negated_stats(stats: torch.Tensor | None) -> torch.Tensor | None:
    if stats is None:
        return None
    return torch.stack([-stats[..., 1], -stats[..., 0], -stats[..., 2], stats[..., 3]], dim=-1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (N,) in voxels; replicate borders. x (N, C, *S)."""
    n, c = x.shape[:2]
    d = x.dim() - 2
    s = sigma.to(x.dtype).clamp_min(0.05).view(-1, 1)
    kernel = get_gaussian_kernel1d(2 * BLUR_RADIUS + 1, s, device=x.device, dtype=x.dtype)  # (N, 2R+1), sum 1
    kernel = kernel.repeat_interleave(c, dim=0)  # (N*C, 2R+1)
    conv = F.conv2d if d == 2 else F.conv3d
    y = x.reshape((1, n * c) + tuple(x.shape[2:]))
    for axis in range(d):
        shape = [n * c, 1] + [1] * d
        shape[2 + axis] = 2 * BLUR_RADIUS + 1
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = BLUR_RADIUS
        y = conv(F.pad(y, pad, mode="replicate"), kernel.view(shape), groups=n * c)
    return y.reshape(x.shape)


def laplacian(x: torch.Tensor) -> torch.Tensor:
    """Discrete Laplacian (sum of second differences) with replicate borders. x (N, C, *S)."""
    d = x.dim() - 2
    padded = F.pad(x, [1, 1] * d, mode="replicate")
    out = -2.0 * d * x
    for axis in range(d):
        for shift in (0, 2):
            index = [slice(None), slice(None)] + [slice(1, -1)] * d
            index[2 + axis] = slice(shift, shift + x.shape[2 + axis])
            out = out + padded[tuple(index)]
    return out


def hash_normal(seed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal field (N, *shape) from integer-valued seeds (N,), deterministic on every device."""
    mask = 0xFFFFFFFF
    numel = math.prod(shape)
    idx = torch.arange(2 * numel, device=seed.device, dtype=torch.int64).view(1, -1)

    def mix(h: torch.Tensor) -> torch.Tensor:
        # Integer avalanche with a 27-bit multiplier: products stay below 2^59, so int64 never overflows.
        h = ((h >> 16) ^ h) * 0x45D9F3B & mask
        h = ((h >> 16) ^ h) * 0x45D9F3B & mask
        return (h >> 16) ^ h

    key = mix(seed.round().to(torch.int64).view(-1, 1) & mask)
    h = mix((mix(idx) + key) & mask).to(torch.float32)
    u = (h + 1.0) / 4294967297.0  # in (0, 1]
    u1, u2 = u[:, :numel], u[:, numel:]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.view((seed.shape[0],) + tuple(shape))


def low_resolution(x: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Simulate a zoom-factor (N,) acquisition: linear downsampling, nearest upsampling back to the grid.

    Output voxel i reads the low-resolution voxel j = floor((i + 0.5) z), which sits at input coordinate
    (j + 0.5) / z - 0.5; one `grid_sample` evaluates this for every sample and axis at once.
    """
    shape = tuple(x.shape[2:])
    z = zoom.to(x.dtype).clamp_min(1e-3).view(-1, 1)
    coords = []
    for n in shape:
        i = torch.arange(n, dtype=x.dtype, device=x.device).view(1, -1)
        j = torch.floor((i + 0.5) * z)
        coords.append(((j + 0.5) / z - 0.5).clamp(0, n - 1) / max(n - 1, 1) * 2 - 1)  # (N, n)
    d = len(shape)
    parts = []
    for axis, c in enumerate(coords):
        view = [x.shape[0]] + [1] * d
        view[1 + axis] = shape[axis]
        parts.append(c.view(view).expand((x.shape[0],) + shape))
    grid = torch.stack(parts[::-1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class IntensityOp(Op):
    """Shared parts: labels untouched, inverse = identity, samples whose params mean "off" returned unchanged.

    By default one scalar param per sample, "off" at `neutral`; an op with more params says when it is on in
    `_active`.
    """

    n_params = 1
    neutral = 1.0  # the param value that means "off"

    def __init__(self, spec: OpSpec):
        self.spec = spec

    def _params(self, bins, mag, sign, generator):
        return torch.pow(1.0 + mag, sign).unsqueeze(1)

    def apply(self, x, params, target="image", stats=None):
        _check_image(self, x, target)
        if target == "mask":
            return x
        return _where(self._active(params), self._transform(x, params, stats), x)

    def _active(self, params: torch.Tensor) -> torch.Tensor:
        """(N,) bool: samples the op changes."""
        return params[:, 0] != self.neutral

    @abc.abstractmethod
    def _transform(self, x: torch.Tensor, params: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        """The op with per-sample `params` (N, n_params) applied to every sample of x (N, C, *S)."""


class GammaOp(IntensityOp):
    """x -> power law with exponent gamma; params (N, 1): gamma (1 = off)."""

    def _transform(self, x, params, stats):
        return gamma_transform(x, params[:, 0], stats)


class InverseGammaOp(IntensityOp):
    """Gamma of the negated image, negated back; params (N, 1): gamma (1 = off)."""

    def _transform(self, x, params, stats):
        return -gamma_transform(-x, params[:, 0], _negated_stats(stats))


class ShiftOp(IntensityOp):
    """x + shift (normalised intensity units); params (N, 1): shift (0 = off)."""

    neutral = 0.0

    def _params(self, bins, mag, sign, generator):
        return (sign * mag).unsqueeze(1)

    def _transform(self, x, params, stats):
        return x + params[:, 0].view(spatial_view(x)).to(x.dtype)


class ScaleIntensityOp(IntensityOp):
    """x * factor; params (N, 1): factor (1 = off)."""

    def _transform(self, x, params, stats):
        return x * params[:, 0].view(spatial_view(x)).to(x.dtype)


class ContrastOp(IntensityOp):
    """(x - mean) * factor + mean, clipped to [min, max] (image-level); params (N, 1): factor (1 = off)."""

    def _transform(self, x, params, stats):
        lo, hi, mean, _ = _stats(x, stats)
        y = (x - mean) * params[:, 0].view(spatial_view(x)).to(x.dtype) + mean
        return torch.minimum(torch.maximum(y, lo), hi)


class BlurSharpenOp(IntensityOp):
    """Gaussian blur, or sharpening x - LoG_sigma(x) clipped to [min, max]; params (N, 2): sigma, mode
    (+1 blur, -1 sharpen, 0 off). The op's bins 1..3 blur and 4..6 sharpen."""

    n_params = 2

    def _params(self, bins, mag, sign, generator):
        n_blur = sum(1 for b in self.spec.bins if b.label.startswith("blur"))
        mode = torch.where(bins == 0, 0.0, torch.where(bins <= n_blur, 1.0, -1.0))
        return torch.stack([mag, mode], dim=1)

    def _active(self, params):
        return params[:, 1] != 0

    def _transform(self, x, params, stats):
        sigma, mode = params[:, 0], params[:, 1]
        blurred = gaussian_blur(x, sigma)
        lo, hi, _, _ = _stats(x, stats)
        sharpened = torch.minimum(torch.maximum(x - laplacian(blurred), lo), hi)
        return torch.where((mode > 0).view(spatial_view(x)), blurred, sharpened)


class NoiseOp(IntensityOp):
    """Additive Gaussian noise; params (N, 2): sigma (0 = off), seed of the counter-based noise field."""

    n_params = 2

    def _params(self, bins, mag, sign, generator):
        if generator is None:
            seed = torch.zeros_like(mag)
        else:
            seed = torch.randint(0, 2**24, mag.shape, generator=generator, device=mag.device).float()
            seed = torch.where(bins == 0, 0.0, seed)  # bin 0 has one canonical params row
        return torch.stack([mag, seed], dim=1)

    def _active(self, params):
        return params[:, 0] != 0

    def _transform(self, x, params, stats):
        noise = hash_normal(params[:, 1], tuple(x.shape[1:])).to(x.dtype)
        return x + params[:, 0].view(spatial_view(x)).to(x.dtype) * noise


class LowResolutionOp(IntensityOp):
    """Low-resolution acquisition; params (N, 1): zoom in (0, 1] (1 = off)."""

    def _params(self, bins, mag, sign, generator):
        return torch.where(bins == 0, 1.0, mag).unsqueeze(1)

    def _transform(self, x, params, stats):
        return low_resolution(x, params[:, 0])
