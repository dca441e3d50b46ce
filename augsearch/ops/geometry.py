"""Geometry of the spatial ops: rotation planes, quarter turns and what a patch allows.

The only place that knows which torch dims a rotation plane spans and when a quarter turn would change a patch's
shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from augsearch.ops.base import BinSpec, OpSpec
from augsearch.ops.tea import TeaEntry


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


def rot90_unavailable(op_specs: Sequence[OpSpec], patch_size: Sequence[int] | None) -> list[tuple[str, int]]:
    """(op name, bin index) of rot90 bins in planes where the patch is not square (the patch would change shape)."""
    if patch_size is None:
        return []
    out = []
    for spec in op_specs:
        axes = plane_axes(spec.name)
        if axes is not None and not _square(patch_size, axes):
            out.extend((spec.name, b) for b, bin_spec in enumerate(spec.bins) if _is_rot90(bin_spec))
    return out


def tea_turns_unavailable(entries: Sequence[TeaEntry], patch_size: Sequence[int] | None) -> list[int]:
    """Ids of the TEA quarter and half turns in planes where the patch is not square (TEA steps run on patches)."""
    if patch_size is None:
        return []
    return [e.id for e in entries if is_turn(e) and not _square(patch_size, plane_axes(e.op))]
