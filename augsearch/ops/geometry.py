"""Geometry of the spatial ops: rotation planes, quarter turns, physical space, and what a patch allows.

The only place that knows which torch dims a rotation plane spans, when a quarter turn would change a patch's shape,
and which rotations voxel spacing allows. Rotations are rotations of the patient, not of the voxel grid (the warp
uses `ops.spatial.voxel_matrices`: D^-1 F D with D = diag(spacing), so a sphere stays a sphere on 1 x 1 x 2.5 mm
data). Quarter turns are exact permutations of the grid, which is the physical
rotation only where the plane's two spacings are equal. On strongly anisotropic data (METHOD 2.3: the coarsest
spacing at least ANISOTROPY_RATIO times the finest, nnU-Net's threshold) rotations that tilt a coarse axis into a
fine one are limited to OUT_OF_PLANE_MAX_DEG: larger angles interpolate across the thick slices.
"""

from __future__ import annotations

from collections.abc import Sequence

from augsearch.ops.base import BinSpec, OpSpec
from augsearch.ops.tea import TeaEntry

ANISOTROPY_RATIO = 3.0
OUT_OF_PLANE_MAX_DEG = 10.0
_SPACING_RTOL = 1e-3  # spacings this close count as equal (headers store them in float32)


def _equal_spacing(spacing: Sequence[float] | None, axes: tuple[int, int]) -> bool:
    if spacing is None or axes[1] >= len(spacing):
        return True
    a, b = float(spacing[axes[0]]), float(spacing[axes[1]])
    return abs(a - b) <= _SPACING_RTOL * max(a, b)


def _tilts_a_coarse_axis(spacing: Sequence[float] | None, axes: tuple[int, int]) -> bool:
    """The plane holds a coarse and a fine axis of strongly anisotropic spacing."""
    if spacing is None or axes[1] >= len(spacing):
        return False
    finest = min(float(v) for v in spacing)
    coarse = [float(spacing[a]) >= ANISOTROPY_RATIO * finest for a in axes]
    return coarse[0] != coarse[1]


def _is_rot90(bin_spec: BinSpec) -> bool:
    return "rot90" in bin_spec.label


def plane_axes(op_name: str) -> tuple[int, int] | None:
    """Spatial axes (0 = x) of a rotation op's plane ('rotate_yz' -> (1, 2)); None for any other op."""
    if not op_name.startswith("rotate_"):
        return None
    plane = op_name.removeprefix("rotate_")
    return "xyz".index(plane[0]), "xyz".index(plane[1])


def is_turn(entry: TeaEntry) -> bool:
    """A TEA quarter or half turn (rot90_*, rot180_*): exact, but only on a grid that is square in its plane."""
    return plane_axes(entry.op) is not None and entry.value is not None and abs(entry.value) >= 90


def _square(patch_size: Sequence[int], axes: tuple[int, int]) -> bool:
    i, j = axes
    return j >= len(patch_size) or int(patch_size[i]) == int(patch_size[j])


def rot90_unavailable(op_specs: Sequence[OpSpec], patch_size: Sequence[int] | None,
                      spacing: Sequence[float] | None = None) -> list[tuple[str, int]]:
    """(op name, bin index) of the rotation bins a patch of `patch_size` on a grid of `spacing` cannot take: rot90
    where the patch is not square (it would change shape) or the plane's spacings differ (it would not be a rotation
    of the patient), and, on strongly anisotropic grids, bins beyond OUT_OF_PLANE_MAX_DEG in planes that tilt a
    coarse axis."""
    out = []
    for spec in op_specs:
        axes = plane_axes(spec.name)
        if axes is None:
            continue
        turns_blocked = (patch_size is not None and not _square(patch_size, axes)) or not _equal_spacing(spacing,
                                                                                                         axes)
        tilt = _tilts_a_coarse_axis(spacing, axes)
        for b, bin_spec in enumerate(spec.bins):
            if (_is_rot90(bin_spec) and (turns_blocked or tilt)) or (tilt and bin_spec.high > OUT_OF_PLANE_MAX_DEG):
                out.append((spec.name, b))
    return out


def tea_turns_unavailable(entries: Sequence[TeaEntry], patch_size: Sequence[int] | None,
                          spacing: Sequence[float] | None = None) -> list[int]:
    """Ids of the TEA rotations a patch cannot take: quarter and half turns in planes where the patch is not square
    (TEA steps run on patches), quarter turns in planes of unequal spacing, and on strongly anisotropic grids every
    rotation beyond OUT_OF_PLANE_MAX_DEG that tilts a coarse axis (half turns excepted: they map the grid onto
    itself)."""
    out = []
    for e in entries:
        axes = plane_axes(e.op)
        if axes is None or e.value is None:
            continue
        angle = abs(float(e.value))
        blocked = (
            (is_turn(e) and patch_size is not None and not _square(patch_size, axes))
            or (angle == 90 and not _equal_spacing(spacing, axes))
            or (_tilts_a_coarse_axis(spacing, axes) and OUT_OF_PLANE_MAX_DEG < angle < 180)
        )
        if blocked:
            out.append(e.id)
    return out
