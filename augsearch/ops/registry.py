"""The one table of TRA ops (METHOD 2.1), 2D and 3D. Bin 0 of every op is "off" (the exact identity).

Signed bins (METHOD 12): each magnitude band of a direction-bearing op has a "+" and a "-" bin, so a policy can
choose a direction. `sample(..., reference_signs=True)` draws the sign at random per sample instead (the reference
code's convention; the +/- bins of a band then behave alike). Bands are those of METHOD 2.1 with each intensity bin
sampling its own band (the corrected behaviour of METHOD 10.2). Magnitude m is drawn uniformly in [low, high]:

| op | bins after "off" (label: band of m) | value applied |
|---|---|---|
| scale | +/-0.05: [0, .1], +/-0.15, +/-0.25, +/-0.35, +/-0.45: [.4, .5] | (1+m)^sign, isotropic, "+" magnifies |
| rotate_xy, _xz, _yz | +/-5: [0, 10], +/-15: [10, 20], +/-25: [20, 30] degrees; rot90+, rot90- | sign*m; quarter turn |
| flip_x, flip_y, flip_z | on | flip of torch dim 2 / 3 / 4 |
| gamma | +/-0.1: [0, .2], +/-0.3: [.2, .4], +/-0.5: [.4, .6] | gamma (1+m)^sign ("+" darkens) |
| inverse_gamma | as gamma | gamma of the negated image ("+" brightens) |
| intensity_shift | +/-0.05: [0, .1], +/-0.15: [.1, .2], +/-0.25: [.2, .3] | x + sign*m |
| intensity_scale | as intensity_shift | x * (1+m)^sign |
| contrast | as intensity_shift | (x - mean) * (1+m)^sign + mean, clipped |
| blur_sharpen | blur0.5: [.4, .6], blur0.7, blur0.9; sharpen0.9, 0.7, 0.5 (same bands) | blur sigma m; x - LoG_m(x) |
| noise | 0.025: [0, .05], 0.075: [.05, .1], 0.125: [.1, .15] | x + N(0, m^2) |
| low_resolution | 0.9: [.8, 1], 0.7: [.6, .8], 0.5: [.4, .6] | zoom m: linear down, nearest up |

Bin order within an op: off, then by magnitude, "+" before "-" (rotations: rot90+, rot90- last). 2D holds scale,
rotate_xy, flip_x, flip_y and every intensity op. Flips, blur/sharpen, noise and low resolution have no direction
(sign 0). A quarter turn needs equal extents in its plane (augment.py leaves such bins out of other patches).
Tolerances: flips, rot90 and intensity ops invert exactly (0); scale and rotations within AFFINE_TOLERANCE on
smooth images, central region.

`apply_params` is the one composition of ops in METHOD order, shared by TRA (augment_batch) and TEA (ops.tea).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from augsearch.ops.base import OFF, BinSpec, Op, OpSpec, UnknownOpError
from augsearch.ops.intensity import (
    BlurSharpenOp,
    ContrastOp,
    GammaOp,
    InverseGammaOp,
    LowResolutionOp,
    NoiseOp,
    ScaleIntensityOp,
    ShiftOp,
)
from augsearch.ops.spatial import (
    PLANES,
    FlipOp,
    RotateOp,
    ScaleOp,
    rot90_where,
    voxel_matrices,
    warp_image,
    warp_mask,
)

ROTATIONS = ("rotate_xy", "rotate_xz", "rotate_yz")
INTENSITY_ORDER = ("noise", "blur_sharpen", "intensity_shift", "intensity_scale", "contrast", "low_resolution",
                   "inverse_gamma", "gamma")  # METHOD 2.1 order after the affine and rot90
FLIPS = ("flip_x", "flip_y", "flip_z")
BOTH = (2, 3)
AFFINE_TOLERANCE = 0.03  # linear interpolation error of a warp and its inverse on smooth images (max abs, unit range)


def _signed(centres: tuple[float, ...], half: float, fmt: str = "{:g}") -> tuple[BinSpec, ...]:
    """For each centre c: a "+" and a "-" bin over [max(0, c - half), c + half]."""
    bins = []
    for c in centres:
        low, high = round(max(0.0, c - half), 6), round(c + half, 6)
        bins += [BinSpec("+" + fmt.format(c), low, high, 1), BinSpec("-" + fmt.format(c), low, high, -1)]
    return tuple(bins)


def _unsigned(prefix: str, centres: tuple[float, ...], half: float) -> tuple[BinSpec, ...]:
    return tuple(BinSpec(f"{prefix}{c:g}", round(max(0.0, c - half), 6), round(c + half, 6), 0) for c in centres)


_ROTATION_BINS = (OFF,) + _signed((5, 15, 25), 5) + (BinSpec("rot90+", 90, 90, 1), BinSpec("rot90-", 90, 90, -1))
_FLIP_BINS = (OFF, BinSpec("on", 1, 1, 0))
_GAMMA_BINS = (OFF,) + _signed((0.1, 0.3, 0.5), 0.1)
_SMALL_BINS = (OFF,) + _signed((0.05, 0.15, 0.25), 0.05)


def _specs() -> tuple[tuple[OpSpec, Op], ...]:
    def spec(name, kind, dims, bins, tol, text):
        return OpSpec(name, kind, dims, bins, tol, text)

    table = []
    table.append(ScaleOp(spec("scale", "spatial", BOTH, (OFF,) + _signed((0.05, 0.15, 0.25, 0.35, 0.45), 0.05),
                              AFFINE_TOLERANCE, "isotropic scale by (1+m)^sign about the patch centre")))
    for plane, dims in (("xy", BOTH), ("xz", (3,)), ("yz", (3,))):
        table.append(RotateOp(spec(f"rotate_{plane}", "spatial", dims, _ROTATION_BINS, AFFINE_TOLERANCE,
                                   f"rotation in the {plane} plane by +/- m degrees, or an exact quarter turn"), plane))
    for axis, letter in enumerate("xyz"):
        table.append(FlipOp(spec(f"flip_{letter}", "spatial", BOTH if axis < 2 else (3,), _FLIP_BINS, 0.0,
                                 f"mirror the {letter} axis (torch dim {2 + axis})"), axis))
    table += [
        GammaOp(spec("gamma", "intensity", BOTH, _GAMMA_BINS, 0.0,
                     "power law gamma=(1+m)^sign on the image-level intensity range, mean/std kept")),
        InverseGammaOp(spec("inverse_gamma", "intensity", BOTH, _GAMMA_BINS, 0.0,
                            "gamma applied to the negated image, negated back")),
        ShiftOp(spec("intensity_shift", "intensity", BOTH, _SMALL_BINS, 0.0, "add sign*m")),
        ScaleIntensityOp(spec("intensity_scale", "intensity", BOTH, _SMALL_BINS, 0.0, "multiply by (1+m)^sign")),
        ContrastOp(spec("contrast", "intensity", BOTH, _SMALL_BINS, 0.0,
                        "scale by (1+m)^sign about the image mean, clipped to the image range")),
        BlurSharpenOp(spec("blur_sharpen", "intensity", BOTH,
                           (OFF,) + _unsigned("blur", (0.5, 0.7, 0.9), 0.1)
                           + _unsigned("sharpen", (0.9, 0.7, 0.5), 0.1),
                           0.0, "Gaussian blur (sigma m voxels) or sharpening x - LoG_m(x)")),
        NoiseOp(spec("noise", "intensity", BOTH, (OFF,) + _unsigned("", (0.025, 0.075, 0.125), 0.025), 0.0,
                     "additive Gaussian noise with standard deviation m")),
        LowResolutionOp(spec("low_resolution", "intensity", BOTH, (OFF,) + _unsigned("", (0.9, 0.7, 0.5), 0.1), 0.0,
                             "downsample by zoom m (linear), upsample back (nearest)")),
    ]
    return tuple((op.spec, op) for op in table)


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Op]:
    return {spec.name: op for spec, op in _specs()}


def list_ops(dims: int | None = None) -> list[str]:
    """Op names in METHOD 2.1 order; with `dims`, only those defined in 2D or 3D."""
    return [name for name, op in _table().items() if dims is None or dims in op.spec.dims]


def get_op(name: str) -> Op:
    """The op called `name`; UnknownOpError lists the valid names."""
    try:
        return _table()[name]
    except KeyError:
        raise UnknownOpError(f"unknown op {name!r}; expected one of {', '.join(list_ops())}") from None


def get_spec(name: str) -> OpSpec:
    return get_op(name).spec


def affine_matrices(params: dict[str, torch.Tensor], dims: int, batch: int, device: torch.device,
                    spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Voxel-space forward matrices (B, d, d) of scale @ R_xy @ R_xz @ R_yz (identity for absent ops), a rotation of
    the patient on a grid of `spacing` mm (None: of the voxel grid)."""
    forward = torch.eye(dims, device=device).repeat(batch, 1, 1)
    if "scale" in params:
        forward = forward @ get_op("scale").matrix(params["scale"], dims)
    for name in ROTATIONS:
        if name in params:
            forward = forward @ get_op(name).matrix(params[name], dims)
    return voxel_matrices(forward, spacing)


def apply_params(image: torch.Tensor, mask: torch.Tensor | None, params: dict[str, torch.Tensor],
                 out_shape: tuple[int, ...], stats: torch.Tensor | None, spacing: Sequence[float] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compose ops in METHOD order: one affine warp of (B, C, *E) onto the central `out_shape`, rot90, intensity
    ops, flips. params: op name -> (B, P) for the ops that take part; mask (B, *E) int64 or None; spacing: the
    grid's mm per axis (rotations of the patient), None for the voxel grid."""
    sample = torch.linalg.inv(affine_matrices(params, len(out_shape), image.shape[0], image.device, spacing))
    out = warp_image(image, sample, out_shape)
    out_mask = None if mask is None else warp_mask(mask, sample, out_shape)
    for name in ROTATIONS:
        if name in params:
            k = params[name][:, 1].round().long()
            plane = PLANES[name.split("_")[1]]
            out = rot90_where(out, k, plane, 2)
            out_mask = None if out_mask is None else rot90_where(out_mask, k, plane, 1)
    for name in INTENSITY_ORDER:
        if name in params:
            out = get_op(name).apply(out, params[name], stats=stats)
    for name in FLIPS:
        if name in params:
            op = get_op(name)
            out = op.apply(out, params[name])
            out_mask = None if out_mask is None else op.apply(out_mask, params[name], target="mask")
    return out, out_mask
