"""TEA pool (METHOD 2.2): atomic, deterministic transforms built from the op registry, with their inverses.

Pool order (ids are positions; names are stable and are what policy files store):

| ids (3D) | names | value |
|---|---|---|
| 0 | identity | - |
| 1-10 | scale_up_0.05, scale_down_0.05, ... scale_down_0.45 | factor (1+s)^+/-1 |
| 11-28 | rotate_yz+5, rotate_yz-5, ..., rotate_xz..., rotate_xy-25 | degrees |
| 29-31 | flip_x, flip_y, flip_z | - |
| 32-40 | rot90_yz+, rot90_yz-, rot180_yz, then xz, then xy | degrees |
| 41-52 | gamma_up_0.1, gamma_down_0.1, ... inverse_gamma_down_0.5 | gamma |
| 53-64 | intensity_shift+0.05, ... intensity_scale_down_0.25 | shift / factor |
| 65-70 | contrast_up_0.05, ... contrast_down_0.25 | factor |
| 71-76 | blur0.5, blur0.7, blur0.9, sharpen0.9, sharpen0.7, sharpen0.5 | sigma |
| 77-79 | noise0.025, noise0.075, noise0.125 | sigma |
| 80-82 | low_resolution0.9, low_resolution0.7, low_resolution0.5 | zoom |
| 83 | flip_all | - |

This is the reference's 84-entry list in its order, planes in the reference's order ((1,2), (0,2), (0,1) = yz, xz,
xy). Magnitudes are exact bin centres. 2D keeps the xy plane and two flips: 1 + 10 + 6 + 2 + 3 + 42 + 1 = 65
(METHOD 2.3). Noise entries draw their field from a fixed seed derived from the entry id, so repeated calls give
identical output. Affine entries resample linearly (the reference used cubic for images; `grid_sample` has no
trilinear-cubic mode in 3D) on the same grid with zeros outside; callers pad by `tea_margin` to keep content.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from augsearch.errors import AugsearchError
from augsearch.ops.base import OpInputError
from augsearch.ops.registry import (
    FLIPS,
    ROTATIONS,
    affine_matrices,
    apply_params,
    get_op,
    list_ops,
)
from augsearch.ops.spatial import PLANES, inside_mask, is_identity, rot90_where, warp

NOISE_SEED_BASE = 104729  # noise entry seed = base * (id + 1)


class UnknownTeaEntryError(AugsearchError):
    """A TEA entry name that the pool of this dimensionality does not hold."""


@dataclass(frozen=True)
class TeaEntry:
    id: int
    name: str
    op: str            # registry op name, or "identity" / "flip_all"
    value: float | None
    spatial: bool


def _row(op_name: str, bin_label: str, magnitude: float, sign: int) -> torch.Tensor:
    op = get_op(op_name)
    index = [b.label for b in op.spec.bins].index(bin_label)
    return op._params(torch.tensor([index]), torch.tensor([float(magnitude)]), torch.tensor([float(sign)]), None)[0]


@functools.lru_cache(maxsize=4)
def _pool(dims: int) -> tuple[tuple[TeaEntry, ...], tuple[dict[str, torch.Tensor], ...]]:
    """Entries and, per entry, the params rows {op name: (P,)} of the ops it sets (all others stay identity)."""
    items: list[tuple[str, str, float | None, bool, dict[str, torch.Tensor]]] = [
        ("identity", "identity", None, True, {})
    ]
    for c in (0.05, 0.15, 0.25, 0.35, 0.45):
        for direction, sign in (("up", 1), ("down", -1)):
            items.append((f"scale_{direction}_{c:g}", "scale", (1 + c) ** sign, True,
                          {"scale": _row("scale", f"{'+' if sign > 0 else '-'}{c:g}", c, sign)}))
    planes = [p for p in ("rotate_yz", "rotate_xz", "rotate_xy") if dims in get_op(p).spec.dims]
    for name in planes:
        for c in (5, 15, 25):
            for sign in (1, -1):
                s = "+" if sign > 0 else "-"
                items.append((f"{name}{s}{c}", name, float(sign * c), True, {name: _row(name, f"{s}{c}", c, sign)}))
    flips = [f for f in FLIPS if dims in get_op(f).spec.dims]
    for name in flips:
        items.append((name, name, None, True, {name: torch.tensor([1.0])}))
    for name in planes:
        plane = name.split("_")[1]
        for label, k in ((f"rot90_{plane}+", 1), (f"rot90_{plane}-", -1), (f"rot180_{plane}", 2)):
            items.append((label, name, 90.0 * k, True, {name: torch.tensor([0.0, float(k)])}))
    for name in ("gamma", "inverse_gamma", "intensity_shift", "intensity_scale", "contrast"):
        centres = (0.1, 0.3, 0.5) if "gamma" in name else (0.05, 0.15, 0.25)
        for c in centres:
            for sign in (1, -1):
                s = "+" if sign > 0 else "-"
                row = _row(name, f"{s}{c:g}", c, sign)
                if name == "intensity_shift":
                    label = f"{name}{s}{c:g}"
                else:
                    label = f"{name}_{'up' if sign > 0 else 'down'}_{c:g}"
                items.append((label, name, float(row[0]), False, {name: row}))
    for kind, centres in (("blur", (0.5, 0.7, 0.9)), ("sharpen", (0.9, 0.7, 0.5))):
        for c in centres:
            items.append((f"{kind}{c:g}", "blur_sharpen", c, False,
                          {"blur_sharpen": _row("blur_sharpen", f"{kind}{c:g}", c, 0)}))
    for c in (0.025, 0.075, 0.125):
        items.append((f"noise{c:g}", "noise", c, False, {"noise": _row("noise", f"{c:g}", c, 0)}))
    for c in (0.9, 0.7, 0.5):
        items.append((f"low_resolution{c:g}", "low_resolution", c, False,
                      {"low_resolution": _row("low_resolution", f"{c:g}", c, 0)}))
    items.append(("flip_all", "flip_all", None, True, {f: torch.tensor([1.0]) for f in flips}))

    entries, rows = [], []
    for i, (name, op, value, spatial, params) in enumerate(items):
        if "noise" in params:
            params["noise"] = torch.tensor([float(params["noise"][0]), float(NOISE_SEED_BASE * (i + 1) % 2**24)])
        entries.append(TeaEntry(i, name, op, value, spatial))
        rows.append(params)
    return tuple(entries), tuple(rows)


@functools.lru_cache(maxsize=16)
def _tables(dims: int, device: torch.device) -> dict[str, torch.Tensor]:
    """op name -> params of every entry (A, P) on `device` (identity rows where the entry leaves the op off)."""
    entries, rows = _pool(dims)
    tables = {}
    for name in list_ops(dims):
        table = get_op(name).identity_params(len(entries))
        for i, params in enumerate(rows):
            if name in params:
                table[i] = params[name]
        tables[name] = table.to(device)
    return tables


def tea_pool(dims: int) -> tuple[TeaEntry, ...]:
    """The pool for 2D or 3D; id 0 is the identity and ids are positions."""
    if dims not in (2, 3):
        raise OpInputError(f"dims must be 2 or 3, got {dims}")
    return _pool(dims)[0]


def tea_entry_by_name(dims: int, name: str) -> TeaEntry:
    for entry in tea_pool(dims):
        if entry.name == name:
            return entry
    raise UnknownTeaEntryError(f"unknown {dims}D TEA entry {name!r}; expected one of "
                               f"{', '.join(e.name for e in tea_pool(dims))}")


def _params(ids: torch.Tensor, dims: int, device: torch.device) -> dict[str, torch.Tensor]:
    n = len(tea_pool(dims))
    if ids.dim() != 1:
        raise OpInputError(f"ids must be a 1-D integer tensor (B,), got shape {tuple(ids.shape)}")
    ids = ids.to(device).long()
    if ids.device.type == "cpu" and ids.numel() and (ids.min() < 0 or ids.max() >= n):
        raise OpInputError(f"TEA ids must lie in [0, {n - 1}] for {dims}D, got {ids.min().item()}..{ids.max().item()}")
    return {name: table[ids] for name, table in _tables(dims, torch.device(device)).items()}


def _check(x: torch.Tensor, ids: torch.Tensor, dims: int, what: str) -> None:
    if x.dim() != dims + 2 or x.shape[0] != ids.shape[0]:
        raise OpInputError(f"{what} must be (B, C, *S) with {dims} spatial dims and B = len(ids) = {ids.shape[0]}, "
                           f"got {tuple(x.shape)}")


def tea_apply(image: torch.Tensor, ids: torch.Tensor, dims: int,
              image_stats: torch.Tensor | None = None, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Apply entry ids[b] to image[b]: (B, C, *S) -> (B, C, *S) on the same grid, zeros outside.
    image_stats (B, C, 4) as in augment_batch (default: each image's own); spacing: the grid's mm per axis, so that
    rotations turn the patient (None: the voxel grid)."""
    _check(image, ids, dims, "image")
    params = _params(ids, dims, image.device)
    out, _ = apply_params(image, None, params, tuple(image.shape[2:]), image_stats, spacing)
    return out


def tea_invert(pred: torch.Tensor, ids: torch.Tensor, dims: int,
               spacing: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map predictions (B, K, *S) (probabilities or logits) of tea_apply-ed inputs back to the original grid.

    Returns (pred (B, K, *S), valid (B, 1, *S) bool: False where the inverse warp read outside the grid).
    Intensity entries invert to the identity; flips and quarter turns are exact."""
    _check(pred, ids, dims, "pred")
    params = _params(ids, dims, pred.device)
    out = pred
    for name in FLIPS:
        if name in params:
            out = get_op(name).invert(out, params[name])
    for name in ROTATIONS[::-1]:
        if name in params:
            out = rot90_where(out, -params[name][:, 1].round().long(), PLANES[name.split("_")[1]], 2)
    forward = affine_matrices(params, dims, pred.shape[0], pred.device, spacing)
    shape = tuple(pred.shape[2:])
    warped = warp(out, forward, shape)  # inverse warp: read at u_in = A u_out
    inside = inside_mask(forward, shape, shape)
    still = is_identity(forward).view((-1,) + (1,) * (pred.dim() - 1))
    return torch.where(still, out, warped), inside | still


def tea_margin(dims: int, ids: Sequence[int] | torch.Tensor, shape: Sequence[int],
               spacing: Sequence[float] | None = None) -> int:
    """Padding (voxels per side) so that the affine entries among `ids` keep all content of an image of spatial
    `shape` inside the grid (and so inside the inverse warp's reach)."""
    if len(shape) != dims:
        raise OpInputError(f"shape must have {dims} entries, got {tuple(shape)}")
    ids = torch.as_tensor(ids).long().cpu()
    params = _params(ids, dims, torch.device("cpu"))
    forward = affine_matrices(params, dims, ids.shape[0], torch.device("cpu"), spacing).double()
    moved = ~is_identity(forward)
    if not bool(moved.any()):
        return 0
    half = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    far = (forward[moved].abs() @ half).amax(0)
    return max(0, math.ceil(float((far - half).max()) - 1e-9)) + 1
