"""Apply one sampled op selection per sample to (image, mask) on the batch's device (METHOD 2.1 composition).

Order: affine (scale and the three rotations as ONE matrix per sample, applied once to the enlarged crop, then the
central patch is kept), rot90, noise, blur/sharpen, intensity shift, intensity scale, contrast, low resolution,
inverse gamma, gamma, flips. Samples whose affine is the identity are cropped, not resampled. Images are resampled
linearly; masks by nearest neighbour (labels keep their value set). Every op runs once on the whole batch and
`torch.where` keeps the identity for samples that did not select it: no per-sample loops and no host syncs.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch

from augsearch.ops.base import OpInputError, make_generator
from augsearch.ops.intensity import image_statistics
from augsearch.ops.registry import ROTATIONS, apply_params, get_op
from augsearch.ops.spatial import PLANES, rotation_matrix, voxel_matrices


def unavailable_bins(op_name: str, patch_size: Sequence[int]) -> list[int]:
    """Bins of `op_name` that cannot run on `patch_size`: rot90 needs equal extents in its plane."""
    op = get_op(op_name)
    dims = len(patch_size)
    if dims not in op.spec.dims:
        raise OpInputError(f"op {op_name!r} is defined for {op.spec.dims}D patches, got a {dims}D patch_size "
                           f"{tuple(patch_size)}; use augsearch.ops.list_ops({dims})")
    if op_name in ROTATIONS:
        a, b = PLANES[op_name.split("_")[1]]
        if patch_size[a] != patch_size[b]:
            return list(op.rot90_bins)
    return []


@functools.lru_cache(maxsize=64)
def _margin(patch: tuple[int, ...], affine_ops: tuple[str, ...], spacing: tuple[float, ...] | None) -> int:
    d = len(patch)
    half = torch.tensor([(n - 1) / 2 for n in patch], dtype=torch.float64)
    reach = 1.0  # largest factor by which a sampling matrix stretches coordinates (scale "down" bins)
    if "scale" in affine_ops:
        reach = max(1 + b.high for b in get_op("scale").spec.bins if b.sign < 0)
    planes = [op for op in ROTATIONS if op in affine_ops]
    angle_sets = []
    for name in planes:
        top = max(b.high for b in get_op(name).spec.bins if not b.label.startswith("rot90"))
        angle_sets.append(torch.linspace(-top, top, 49, dtype=torch.float64))  # 1.25-degree steps
    combos = (torch.tensor(list(itertools.product(*angle_sets)), dtype=torch.float64) if planes
              else torch.zeros(1, 0, dtype=torch.float64))
    m = torch.eye(d, dtype=torch.float64).repeat(combos.shape[0], 1, 1)
    for j, name in enumerate(planes):
        m = m @ rotation_matrix(combos[:, j], PLANES[name.split("_")[1]], d)
    sample = torch.linalg.inv(voxel_matrices(m, spacing)) * reach
    # The farthest a corner of the patch reads along axis i is sum_j |M_ij| half_j.
    far = (sample.abs() @ half).amax(0)
    # +1 covers the angle grid's discretisation and float error; reading at exactly the last voxel is inside.
    return max(0, math.ceil(float((far - half).max()) - 1e-9) + 1) if (planes or reach > 1) else 0


def required_margin(patch_size: Sequence[int], op_names: Sequence[str], spacing: Sequence[float] | None = None) -> int:
    """Crop margin (voxels per side, all axes) so that the largest scale and rotations of `op_names` (rotations of
    the patient on a grid of `spacing` mm) never read outside a crop of patch_size + 2 * margin."""
    for name in op_names:
        get_op(name)
    affine = tuple(sorted(n for n in op_names if n == "scale" or n in ROTATIONS))
    grid = None if spacing is None else tuple(float(s) for s in spacing)
    return _margin(tuple(int(p) for p in patch_size), affine, grid)


def _validate(image, mask, bins, op_names, patch) -> None:
    d = len(patch)
    if image.dim() != d + 2 or not image.is_floating_point():
        raise OpInputError(f"image must be float (B, C, *E) with {d} spatial dims for patch_size {patch}, got "
                           f"{tuple(image.shape)} {image.dtype}")
    if tuple(mask.shape) != (image.shape[0],) + tuple(image.shape[2:]):
        raise OpInputError(f"mask must be (B, *E) = {(image.shape[0],) + tuple(image.shape[2:])}, got "
                           f"{tuple(mask.shape)}; pass label values, not one-hot")
    if tuple(bins.shape) != (image.shape[0], len(op_names)):
        raise OpInputError(f"bins must be (B, n_ops) = {(image.shape[0], len(op_names))}, got {tuple(bins.shape)}")
    for n_in, n_out in zip(image.shape[2:], patch):
        if n_in < n_out or (n_in - n_out) % 2:
            raise OpInputError(f"enlarged crop {tuple(image.shape[2:])} must exceed patch_size {patch} by an even "
                               f"number of voxels per axis; crop patch_size + 2 * required_margin(...)")
    for j, name in enumerate(op_names):
        op = get_op(name)
        if d not in op.spec.dims:
            raise OpInputError(f"op {name!r} is not defined for {d}D patches; use augsearch.ops.list_ops({d})")
        bad = unavailable_bins(name, patch)
        if bad and bool(torch.isin(bins[:, j], torch.tensor(bad, device=bins.device)).any()):
            raise OpInputError(f"bins {bad} of {name!r} (rot90) are unavailable for patch_size {patch}: the plane's "
                               f"extents differ; give them probability zero")


def augment_batch(image: torch.Tensor, mask: torch.Tensor, bins: torch.Tensor, op_names: Sequence[str],
                  patch_size: Sequence[int], *, generator: torch.Generator | None = None,
                  reference_signs: bool = False,
                  image_stats: torch.Tensor | None = None,
                  spacing: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment an enlarged batch and cut the central patch.

    image (B, C, *E) float, mask (B, *E) int64, bins (B, n_ops) int64 over `op_names`, E = patch_size + 2 * margin.
    image_stats (B, C, 4): image-level (min, max, mean, std); default: those of the enlarged crop. spacing: the grid's
    mm per axis, so that rotations turn the patient (None: the voxel grid; required_margin must be given the same).
    Returns (image (B, C, *P), mask (B, *P)). `generator` must live on the tensors' device.
    """
    patch = tuple(int(p) for p in patch_size)
    op_names = tuple(op_names)
    _validate(image, mask, bins, op_names, patch)
    gen = make_generator(image.device, generator)
    bins = bins.to(image.device).long()
    params = {name: get_op(name).sample(bins[:, j], gen, reference_signs) for j, name in enumerate(op_names)}
    # An op that no sample draws (bin 0 in every row) is the exact identity: leave it out of the composition. Every
    # op is still sampled, so the generator's stream is unchanged; one read of the bins saves the kernels of the ops
    # left out, which dominate augmentation on a GPU at small patches.
    drawn = (bins != 0).any(0).tolist()
    params = {name: value for (name, value), on in zip(params.items(), drawn, strict=True) if on}
    stats = image_statistics(image) if image_stats is None else image_stats.to(image.device, image.dtype)

    return apply_params(image, mask, params, patch, stats, spacing)
