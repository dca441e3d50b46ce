"""Connected-component post-processing of a predicted label map: drop components below a volume, keep the largest.

Components are labelled per class with scikit-image (full connectivity: 8 in 2D, 26 in 3D). A removed component
becomes background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from skimage.measure import label as connected_components

from augsearch.errors import AugsearchError


@dataclass(frozen=True)
class Postprocess:
    """min_volume_mm3: components of any foreground class smaller than this are removed (0: none).
    keep_largest: label values whose largest component alone is kept."""

    min_volume_mm3: float = 0.0
    keep_largest: tuple[int, ...] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        return self.min_volume_mm3 > 0 or bool(self.keep_largest)


def postprocess_from_options(min_volume_mm3: float, keep_largest: Sequence[str], label_names: dict[str, int]
                             ) -> Postprocess:
    """A Postprocess from CLI options: class names (or values) in keep_largest checked against the labels."""
    if min_volume_mm3 < 0:
        raise AugsearchError(f"--min-component-mm3 must be >= 0, got {min_volume_mm3}")
    values = []
    for item in keep_largest:
        if item in label_names:
            values.append(label_names[item])
        elif item.isdigit() and int(item) in label_names.values():
            values.append(int(item))
        else:
            raise AugsearchError(f"--keep-largest {item!r} is not a label of the model; labels: {label_names}")
    if 0 in values:
        raise AugsearchError("--keep-largest names the background; give foreground classes")
    return Postprocess(min_volume_mm3=float(min_volume_mm3), keep_largest=tuple(values))


def apply_postprocess(labels: np.ndarray, spacing: Sequence[float], options: Postprocess) -> np.ndarray:
    """labels (*S) integer map on a grid of `spacing` mm -> post-processed copy (same shape and dtype)."""
    if not options.active:
        return labels
    out = labels.copy()
    voxel_mm3 = math.prod(float(s) for s in spacing)
    for value in np.unique(labels):
        if value == 0:
            continue
        components = connected_components(labels == value, connectivity=labels.ndim)
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        keep = sizes * voxel_mm3 >= options.min_volume_mm3
        if int(value) in options.keep_largest and sizes.max() > 0:
            keep &= np.arange(sizes.size) == int(sizes.argmax())
        keep[0] = True
        out[(components > 0) & ~keep[components]] = 0
    return out
