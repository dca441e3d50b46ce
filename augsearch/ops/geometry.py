"""Geometry of the spatial ops: rotation planes, quarter turns and what a patch allows.

The only place that knows which torch dims a rotation plane spans and when a quarter turn would change a patch's
shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from augsearch.ops.base import BinSpec, OpSpec


def _is_rot90(bin_spec: BinSpec) -> bool:
    return "rot90" in bin_spec.label



def rot90_unavailable(op_specs: Sequence[OpSpec], patch_size: Sequence[int] | None) -> list[tuple[str, int]]:
    """(op name, bin index) of rot90 bins in planes where the patch is not square (the patch would change shape)."""
    if patch_size is None:
        return []
    axes = "xyz"
    out = []
    for spec in op_specs:
        if not spec.name.startswith("rotate_"):
            continue
        plane = spec.name.removeprefix("rotate_")
        i, j = axes.index(plane[0]), axes.index(plane[1])
        if j < len(patch_size) and int(patch_size[i]) != int(patch_size[j]):
            out.extend((spec.name, b) for b, bin_spec in enumerate(spec.bins) if _is_rot90(bin_spec))
    return out
