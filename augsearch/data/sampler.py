"""Class-anchored patch sampler: every patch knows the label of the voxel it is centred on (METHOD 3.2).

A share `fg_fraction` of the patches is centred on foreground: the case is drawn uniformly among cases with any
foreground, the class uniformly among the foreground classes present in that case, the centre uniformly among that
class's voxels. The other patches are centred on a background voxel of a case drawn uniformly among cases with
background. Fallbacks: when no case has foreground, foreground patches become background-anchored; when no case has
background, background patches are anchored on a uniform voxel of a uniform case. `anchor_class` is always the label
value at the anchor, so it tells the truth after a fallback.

Crops are `patch_size + 2 * margin` voxels per axis with the anchor at index `crop // 2`, zero padded (image 0,
mask 0 = background) where they leave the volume. The number of foreground patches in a batch of B is
`floor(f * B)` plus one with probability `frac(f * B)`, so its mean is exactly `f * B`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from augsearch.data.dataset import Case
from augsearch.errors import DatasetError


@dataclass
class Batch:
    image: torch.Tensor  # (B, C, *P_enlarged) float32
    mask: torch.Tensor  # (B, *P_enlarged) int64
    anchor_class: torch.Tensor  # (B,) int64: label value at which the patch is centred (0 = background)
    case_index: torch.Tensor  # (B,) int64


class PatchSampler:
    """Draw class-anchored patches from preprocessed labelled cases; reproducible from `seed`."""

    def __init__(self, cases: list[Case], patch_size: Sequence[int], *, fg_fraction: float = 0.5, margin: int = 0,
                 seed: int = 0):
        if not cases:
            raise DatasetError("sampler", "at least one case", "none", "pass the training cases")
        dims = cases[0].image.ndim - 1
        if len(patch_size) != dims:
            raise DatasetError("train.patch_size", f"{dims} sizes (the cases are {dims}D)", f"{list(patch_size)}",
                               f"give one size per spatial axis, e.g. {[64] * dims}")
        if not 0.0 <= fg_fraction <= 1.0:
            raise DatasetError("train.fg_fraction", "a value in [0, 1]", str(fg_fraction), "set it between 0 and 1")
        for case in cases:
            if case.label is None:
                raise DatasetError(case.case_id, "a labelled case", "no label", "sample only training cases")
        self.cases = cases
        self.patch_size = tuple(int(p) for p in patch_size)
        self.margin = int(margin)
        self.crop_size = tuple(p + 2 * self.margin for p in self.patch_size)
        self.fg_fraction = float(fg_fraction)
        self._rng = np.random.default_rng(seed)
        # Per case: label value -> flat voxel indices, computed once so that drawing a centre is O(1).
        self._index: list[dict[int, np.ndarray]] = []
        for case in cases:
            flat = case.label.reshape(-1)
            dtype = np.int32 if flat.size < 2**31 else np.int64
            order = np.argsort(flat, kind="stable").astype(dtype)
            values, starts = np.unique(flat[order], return_index=True)
            bounds = list(starts[1:]) + [flat.size]
            self._index.append({int(v): order[s:e] for v, s, e in zip(values, starts, bounds)})
        self._fg_cases = np.array([i for i, idx in enumerate(self._index) if any(v != 0 for v in idx)], np.int64)
        self._bg_cases = np.array([i for i, idx in enumerate(self._index) if 0 in idx], np.int64)

    def sample(self, batch_size: int, *, fg_fraction: float | None = None,
               generator: np.random.Generator | None = None, anchor_classes: Sequence[int] | None = None) -> Batch:
        """A batch of `batch_size` crops; `generator` replaces the sampler's own stream for this call.

        anchor_classes: foreground patches are centred only on these label values (drawn among the cases that have
        one; a case list without any falls back to all foreground classes).
        """
        rng = self._rng if generator is None else generator
        f = self.fg_fraction if fg_fraction is None else float(fg_fraction)
        n_fg = int(np.floor(f * batch_size))
        n_fg += int(rng.random() < f * batch_size - n_fg)
        want_fg = rng.permutation(np.arange(batch_size) < n_fg)
        dims = len(self.crop_size)
        n_channels = self.cases[0].image.shape[0]
        image = np.zeros((batch_size, n_channels, *self.crop_size), np.float32)
        mask = np.zeros((batch_size, *self.crop_size), np.int64)
        anchor_class = np.zeros(batch_size, np.int64)
        case_index = np.zeros(batch_size, np.int64)
        for b in range(batch_size):
            ci, flat_index = self._draw_anchor(bool(want_fg[b]), rng, anchor_classes)
            case = self.cases[ci]
            centre = np.unravel_index(flat_index, case.label.shape)
            self._crop(case, centre, image[b], mask[b], dims)
            anchor_class[b] = int(case.label[centre])
            case_index[b] = ci
        return Batch(image=torch.from_numpy(image), mask=torch.from_numpy(mask),
                     anchor_class=torch.from_numpy(anchor_class), case_index=torch.from_numpy(case_index))

    def _draw_anchor(self, foreground: bool, rng: np.random.Generator,
                     anchor_classes: Sequence[int] | None = None) -> tuple[int, int]:
        if foreground and anchor_classes is not None:
            wanted = set(anchor_classes)
            cases = [i for i, idx in enumerate(self._index) if wanted & set(idx)]
            if cases:
                ci = cases[rng.integers(len(cases))]
                classes = sorted(wanted & set(self._index[ci]))
                voxels = self._index[ci][classes[rng.integers(len(classes))]]
                return ci, int(voxels[rng.integers(len(voxels))])
        if foreground and len(self._fg_cases):
            ci = int(self._fg_cases[rng.integers(len(self._fg_cases))])
            classes = sorted(v for v in self._index[ci] if v != 0)
            voxels = self._index[ci][classes[rng.integers(len(classes))]]
        elif len(self._bg_cases):
            ci = int(self._bg_cases[rng.integers(len(self._bg_cases))])
            voxels = self._index[ci][0]
        else:
            ci = int(rng.integers(len(self.cases)))
            return ci, int(rng.integers(self.cases[ci].label.size))
        return ci, int(voxels[rng.integers(len(voxels))])

    def _crop(self, case: Case, centre: tuple, out_image: np.ndarray, out_mask: np.ndarray, dims: int) -> None:
        """Copy the crop around `centre` into the zero-initialised outputs, clipping at the volume border."""
        src, dst = [], []
        for axis in range(dims):
            start = int(centre[axis]) - self.crop_size[axis] // 2
            lo, hi = max(start, 0), min(start + self.crop_size[axis], case.label.shape[axis])
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        out_image[(slice(None), *dst)] = case.image[(slice(None), *src)]
        out_mask[tuple(dst)] = case.label[tuple(src)]


def concat_batches(*batches: Batch) -> Batch:
    """One batch of the given batches' samples, in order."""
    return Batch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(Batch)})
