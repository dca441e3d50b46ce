"""Spatial ops (scale, rotations with a rot90 bin, flips) and the batched geometry they share.

Conventions (torch dims 2, 3, 4 are x, y, z):
- A forward matrix A (N, d, d) moves content: the voxel at centred coordinate u lands at A u. The array centre
  ((n - 1) / 2 per axis) is fixed. Scale "up" (factor f > 1) magnifies content: A = f I.
- A rotation by +theta in plane (a, b) turns axis a towards axis b: A[a,a] = A[b,b] = cos, A[b,a] = sin,
  A[a,b] = -sin. `torch.rot90(x, 1, dims=(a, b))` is exactly the +90 degree case.
- Warps resample with kornia's `warp_affine` / `warp_affine3d` (align_corners=True, zeros outside): linear for
  images and predictions, nearest for label masks, so labels stay in their value set. Rotation matrices come from
  kornia's `axis_angle_to_rotation_matrix`. rot90 and flips are exact tensor permutations (`torch.rot90`,
  `torch.flip` under `torch.where` over the batch: kornia's versions act on the whole batch alike); samples whose
  matrix is exactly the identity bypass the warp, so they stay bit-exact.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from kornia.geometry.transform import warp_affine, warp_affine3d

from augsearch.ops.base import Op, OpInputError, OpSpec, spatial_view

PLANES: dict[str, tuple[int, int]] = {"xy": (0, 1), "xz": (0, 2), "yz": (1, 2)}  # spatial axes of each plane
AXES = "xyz"


# Axis-angle direction of a positive rotation in each plane (turning the plane's first axis towards its second).
_PLANE_AXIS = {(0, 1): (0.0, 0.0, 1.0), (0, 2): (0.0, -1.0, 0.0), (1, 2): (1.0, 0.0, 0.0)}


def rotation_matrix(angle_deg: torch.Tensor, plane: tuple[int, int], dims: int) -> torch.Tensor:
    """Forward rotation matrices (N, d, d) for angles (N,) in degrees in `plane` (spatial axes a, b)."""
    axis = torch.tensor(_PLANE_AXIS[plane], dtype=torch.float32, device=angle_deg.device)
    rad = angle_deg.float() * (math.pi / 180.0)
    matrix = axis_angle_to_rotation_matrix(rad.unsqueeze(1) * axis)  # (N, 3, 3) in x, y, z
    return matrix[:, :dims, :dims].to(angle_deg.dtype)


def voxel_matrices(forward: torch.Tensor, spacing: tuple[float, ...] | list[float] | None) -> torch.Tensor:
    """Physical forward matrices (N, d, d) -> the voxel-space maps D^-1 F D on a grid of `spacing` (None: as is)."""
    if spacing is None:
        return forward
    d = forward.shape[-1]
    s = torch.tensor([float(v) for v in spacing[:d]], dtype=forward.dtype, device=forward.device)
    return forward * s.view(1, 1, d) / s.view(1, d, 1)


def centred_grid(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Centred voxel coordinates (prod(shape), d), axis order x, y, z."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def sample_coordinates(sample_matrix: torch.Tensor, in_shape: tuple[int, ...],
                       out_shape: tuple[int, ...]) -> torch.Tensor:
    """Input voxel coordinates (N, *out_shape, d) read by each output voxel: centre-to-centre, u_in = M u_out."""
    base = centred_grid(out_shape, sample_matrix.device)
    pts = torch.einsum("nij,pj->npi", sample_matrix.float(), base)
    centre = torch.tensor([(n - 1) / 2 for n in in_shape], dtype=torch.float32, device=sample_matrix.device)
    return (pts + centre).reshape((sample_matrix.shape[0],) + tuple(out_shape) + (len(in_shape),))


def warp(x: torch.Tensor, sample_matrix: torch.Tensor, out_shape: tuple[int, ...],
         mode: Literal["bilinear", "nearest"] = "bilinear") -> torch.Tensor:
    """Resample x (N, C, *E) at u_in = M u_out on an output grid `out_shape` sharing E's centre -> (N, C, *out_shape).

    kornia takes the forward pixel map p_out = A p_in + t (A = M^-1, centres mapped onto centres) with its axes in
    reverse order (its x is the last torch dim); zeros outside E.
    """
    d = len(out_shape)
    in_shape = tuple(x.shape[2:])
    forward = torch.linalg.inv(sample_matrix.double())
    c_in = torch.tensor([(n - 1) / 2 for n in in_shape], dtype=torch.float64, device=x.device)
    c_out = torch.tensor([(n - 1) / 2 for n in out_shape], dtype=torch.float64, device=x.device)
    shift = c_out - forward @ c_in
    reverse = list(range(d))[::-1]
    matrix = torch.cat([forward[:, reverse][:, :, reverse], shift[:, reverse].unsqueeze(-1)], dim=-1).to(x.dtype)
    if d == 3:
        return warp_affine3d(x, matrix, tuple(out_shape), flags=mode, padding_mode="zeros", align_corners=True)
    return warp_affine(x, matrix, tuple(out_shape), mode=mode, padding_mode="zeros", align_corners=True)


def inside_mask(sample_matrix: torch.Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> torch.Tensor:
    """(N, 1, *out_shape) bool: the point u_in = M u_out that each output voxel reads lies within the input grid."""
    coords = sample_coordinates(sample_matrix, in_shape, out_shape)
    last = torch.tensor([n - 1 for n in in_shape], dtype=torch.float32, device=sample_matrix.device)
    eps = 1e-4  # float error of the grid; a sample point this close to the border reads the border voxel
    return ((coords >= -eps) & (coords <= last + eps)).all(-1).unsqueeze(1)


def centre_crop(x: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """Central `out_shape` of x (..., *E) (E - out_shape even per axis)."""
    d = len(out_shape)
    index = [slice(None)] * (x.dim() - d)
    for n_in, n_out in zip(x.shape[-d:], out_shape):
        start = (n_in - n_out) // 2
        index.append(slice(start, start + n_out))
    return x[tuple(index)]


def is_identity(matrix: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the matrix (N, d, d) is exactly the identity."""
    return (matrix == torch.eye(matrix.shape[-1], device=matrix.device)).all(-1).all(-1)


def warp_image(x: torch.Tensor, sample_matrix: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """Linear warp of x (N, C, *E) reading u_in = M u_out, onto the central `out_shape`; samples whose matrix is
    exactly the identity are passed through unresampled."""
    warped = warp(x, sample_matrix, out_shape)
    return torch.where(is_identity(sample_matrix).view(spatial_view(x)), centre_crop(x, out_shape), warped)


def warp_mask(mask: torch.Tensor, sample_matrix: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour warp of a label mask (N, *E) int64 (values kept exactly; background 0 outside)."""
    moved = ~is_identity(sample_matrix)
    warped = warp(mask.unsqueeze(1).float(), sample_matrix, out_shape, mode="nearest")
    warped = warped.squeeze(1).round().to(mask.dtype)
    return torch.where(moved.view((-1,) + (1,) * len(out_shape)), warped, centre_crop(mask, out_shape))


def rot90_where(x: torch.Tensor, k: torch.Tensor, plane: tuple[int, int], first_spatial: int) -> torch.Tensor:
    """Rotate each sample of x (N, ..., *S) by k[n] * 90 degrees (any integer k) in `plane`, exactly.

    The rotated groups are formed with `torch.where` over the batch (no per-sample loop, no host sync)."""
    dims = (first_spatial + plane[0], first_spatial + plane[1])
    if x.shape[dims[0]] != x.shape[dims[1]]:
        if bool((k != 0).any()):
            raise OpInputError(f"rot90 in the plane of torch dims {dims} needs equal extents, got shape "
                               f"{tuple(x.shape)}; give the rot90 bins of that plane probability zero (a policy built "
                               "with this patch size does: make_policy(patch_size=...) or Policy.with_patch_size)")
        return x
    view = (-1,) + (1,) * (x.dim() - 1)
    k = torch.remainder(k, 4)
    out = x
    for turns in (1, 2, 3):
        out = torch.where((k == turns).view(view), torch.rot90(x, turns, dims), out)
    return out


def flip_where(x: torch.Tensor, on: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip torch dim `dim` of the samples where on (N,) is true."""
    return torch.where(on.view((-1,) + (1,) * (x.dim() - 1)), torch.flip(x, (dim,)), x)


class ScaleOp(Op):
    """Isotropic scale; params (N, 1): factor (1 = off)."""

    n_params = 1

    def __init__(self, spec: OpSpec):
        self.spec = spec

    def _params(self, bins, mag, sign, generator):
        return torch.pow(1.0 + mag, sign).unsqueeze(1)

    def matrix(self, params: torch.Tensor, dims: int) -> torch.Tensor:
        """Forward matrices (N, d, d)."""
        eye = torch.eye(dims, device=params.device)
        return params[:, 0].view(-1, 1, 1) * eye

    def apply(self, x, params, target="image", stats=None):
        return _apply_affine(x, self.matrix(params, _dims(x, target)), target)

    def invert(self, x, params):
        return _invert_affine(x, self.matrix(params, x.dim() - 2))


class RotateOp(Op):
    """Rotation in one plane; params (N, 2): angle in degrees (affine bins), k quarter turns (rot90 bins)."""

    n_params = 2

    def __init__(self, spec: OpSpec, plane: str):
        self.spec = spec
        self.plane = PLANES[plane]
        self.rot90_bins = tuple(i for i, b in enumerate(spec.bins) if b.label.startswith("rot90"))

    def _params(self, bins, mag, sign, generator):
        quarter = torch.zeros_like(bins, dtype=torch.bool)
        for i in self.rot90_bins:
            quarter |= bins == i
        angle = torch.where(quarter, 0.0, sign * mag)
        k = torch.where(quarter, sign, 0.0)
        return torch.stack([angle, k], dim=1)

    def matrix(self, params: torch.Tensor, dims: int) -> torch.Tensor:
        """Forward matrices (N, d, d) of the non-rot90 part."""
        return rotation_matrix(params[:, 0], self.plane, dims)

    def apply(self, x, params, target="image", stats=None):
        first = 2 if target == "image" else 1
        out = _apply_affine(x, self.matrix(params, x.dim() - first), target)
        return rot90_where(out, params[:, 1].round().long(), self.plane, first)

    def invert(self, x, params):
        out = rot90_where(x, -params[:, 1].round().long(), self.plane, 2)
        return _invert_affine(out, self.matrix(params, x.dim() - 2))


class FlipOp(Op):
    """Flip of one spatial axis; params (N, 1): 1 = flip."""

    n_params = 1

    def __init__(self, spec: OpSpec, axis: int):
        self.spec = spec
        self.axis = axis

    def _params(self, bins, mag, sign, generator):
        return (bins != 0).float().unsqueeze(1)

    def apply(self, x, params, target="image", stats=None):
        first = 2 if target == "image" else 1
        if self.axis >= x.dim() - first:
            raise OpInputError(f"{self.name} needs a 3D input, got shape {tuple(x.shape)} ({target})")
        return flip_where(x, params[:, 0] > 0.5, first + self.axis)

    def invert(self, x, params):
        return flip_where(x, params[:, 0] > 0.5, 2 + self.axis)


def _dims(x: torch.Tensor, target: str) -> int:
    return x.dim() - (2 if target == "image" else 1)


def _apply_affine(x: torch.Tensor, forward: torch.Tensor, target: str) -> torch.Tensor:
    """Warp onto the same grid: image linear, mask nearest."""
    if target == "image":
        return warp_image(x, torch.linalg.inv(forward), tuple(x.shape[2:]))
    if target == "mask":
        return warp_mask(x, torch.linalg.inv(forward), tuple(x.shape[1:]))
    raise OpInputError(f"target must be 'image' or 'mask', got {target!r}")


def _invert_affine(pred: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """Linear inverse warp of predictions (N, K, *S) on the same grid (zeros where it samples outside)."""
    return warp_image(pred, forward, tuple(pred.shape[2:]))
