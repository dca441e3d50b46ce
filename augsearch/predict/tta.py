"""Test-time augmentation at inference: predict a whole volume under the policy's selected TEA entries.

Each selected entry z transforms the whole volume (on a grid enlarged by `tea_margin` for affine entries, so
nothing is cropped, and made square in the plane of quarter turns); the windows of all Z views go through one
batched sliding-window pass; each view's map is brought back by `tea_invert` and the views are averaged with the
policy's weights w_z. Where an inverse leaves a voxel outside its view (validity mask false), the weights of the
remaining views are renormalised at that voxel (METHOD 5, 10.10-10.11).

Aggregation: "probabilities" (default) is the weighted mean of the views' softmax maps; "logits" is the weighted mean
of the views' logit maps followed by a softmax (the reference code's choice).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from augsearch.errors import AugsearchError
from augsearch.ops.geometry import is_turn, plane_axes
from augsearch.ops.tea import tea_apply, tea_invert, tea_margin, tea_pool
from augsearch.policy.core import Policy
from augsearch.predict.sliding_window import sliding_window_predict

# Floor for log(p) in the entropy: keeps 0 * log 0 = 0 without NaN.
_TINY = 1e-12


class TTAError(AugsearchError):
    """Arguments of a TTA prediction that do not fit together (policy, model, image, window)."""


@dataclass(frozen=True)
class TTAResult:
    """What `predict_tta` returns; the same fields whatever the flags (uncertainty fields are None when not asked).

    probabilities: (K, *S) float32, the aggregate class probabilities (sum to 1 over K).
    entropy: (*S) float32 predictive entropy of `probabilities` in nats, or None.
    variance: (*S) float32 weighted variance across views of the foreground probability 1 - P(background), or None.
    views: names of the TEA entries used, in the policy's order (best first).
    weights: their normalised weights (sum to 1).
    view_volumes: (Z,) float32 foreground volume of each view's own argmax in mm^3 (voxels x `spacing` product;
        spacing 1 when not given), or None.
    """

    probabilities: Tensor
    entropy: Tensor | None
    variance: Tensor | None
    views: list[str]
    weights: list[float]
    view_volumes: Tensor | None


def _check_policy(policy: Policy | None) -> Policy | None:
    if policy is None or isinstance(policy, Policy):
        return policy
    raise TTAError(
        f"policy must be a Policy or None, got {type(policy).__name__}; load a file or preset first with "
        "augsearch.policy.presets.policy_from_file_or_preset(name_or_path, dims, label_names)"
    )


def selected_views(policy: Policy | None, dims: int, top_k: int | None = None) -> tuple[list[int], list[float]]:
    """Pool ids and normalised weights of the entries used at inference; None (no policy) is identity alone."""
    if top_k is not None and top_k < 1:
        raise TTAError(f"top_k must be >= 1 (the number of TEA views), got {top_k}")
    if policy is None:
        return [0], [1.0]
    chosen = policy.tea_selected(top_k)
    ids = [int(pool_id) for pool_id, _ in chosen]
    total = sum(float(weight) for _, weight in chosen)
    return ids, [float(weight) / total for _, weight in chosen]


class _OutputCheck(nn.Module):
    """Wraps the segmenter to fail early, with a clear message, when its class count differs from the policy's."""

    def __init__(self, model: nn.Module, num_labels: int, labels: dict[str, int]) -> None:
        super().__init__()
        self.model = model
        self.num_labels = num_labels
        self.labels = labels

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        logits = out[0] if isinstance(out, (list, tuple)) else out
        if logits.dim() != x.dim() or logits.shape[1] != self.num_labels:
            raise TTAError(
                f"the model outputs {tuple(logits.shape)} (N, K, *S) logits but the policy has {self.num_labels} "
                f"labels {self.labels}; use the policy learned with this model, or a model with "
                f"{self.num_labels} output channels"
            )
        return logits


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the prediction (deep supervision returns one map), the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_image(image: Tensor | np.ndarray) -> Tensor:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if not isinstance(image, Tensor):
        raise TTAError(f"image must be a (C, *S) torch tensor or numpy array, got {type(image).__name__}")
    if image.dim() not in (3, 4):
        raise TTAError(
            f"image must be channel-first (C, X, Y) or (C, X, Y, Z), got shape {tuple(image.shape)}; add the "
            "channel axis (image[None]) for a single-channel volume"
        )
    return image.float()


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    param = next(iter(model.parameters()), None)
    if device is None:
        return param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if param is not None and param.device.type != device.type:
        raise TTAError(f"device={device} but the model's parameters are on {param.device}; call model.to({device!r})")
    return device


def _window(window: int | Sequence[int] | None, spatial: tuple[int, ...]) -> tuple[int, ...] | None:
    if window is None:
        return None
    window = (int(window),) * len(spatial) if isinstance(window, int) else tuple(int(w) for w in window)
    if len(window) != len(spatial) or min(window) < 1:
        raise TTAError(f"window must give one positive size per spatial axis of {spatial}, got {window}")
    return window


def view_padding(spatial: Sequence[int], ids: Sequence[int], dims: int,
                 spacing: Sequence[float] | None = None) -> tuple[list[int], list[int]]:
    """Zero padding (before, after) per spatial axis of the grid that all views of `ids` share.

    Affine entries need `tea_margin` on every side. Quarter and half turns need equal extents in their plane, so
    those axes grow to the plane's largest extent (split as evenly as possible); the turn is exact on that grid.
    """
    margin = tea_margin(dims, ids, spatial, spacing)
    size = [n + 2 * margin for n in spatial]
    pool = tea_pool(dims)
    planes = {plane_axes(pool[i].op) for i in ids if is_turn(pool[i])}
    changed = True
    while changed:  # planes can share an axis (xy and xz): grow until every turned plane is square
        changed = False
        for a, b in planes:
            if size[a] != size[b]:
                size[a] = size[b] = max(size[a], size[b])
                changed = True
    before = [margin + (m - n - 2 * margin) // 2 for n, m in zip(spatial, size, strict=True)]
    after = [m - n - b for n, m, b in zip(spatial, size, before, strict=True)]
    return before, after


def predict_tta(
    model: nn.Module,
    image: Tensor | np.ndarray,
    policy: Policy | None,
    *,
    spacing: Sequence[float] | None = None,
    top_k: int | None = None,
    window: int | Sequence[int] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    overlap: float = 0.5,
    aggregate: Literal["probabilities", "logits"] = "probabilities",
    return_uncertainty: bool = False,
    pad_to_window: bool = False,
) -> TTAResult:
    """Predict a preprocessed volume with test-time augmentation.

    model: any module mapping (B, C, *W) -> logits (B, K, *W) (or a list, first entry used); put in eval mode
        for the call, its own mode restored after.
    image: (C, *S) preprocessed volume, tensor or numpy array, 2D or 3D.
    policy: a Policy (load files and presets with `policy_from_file_or_preset`), or None for no TTA (identity
        alone; gives sliding_window_predict exactly).
    spacing: mm per spatial axis: rotations turn the patient on this grid (as in training), and `view_volumes`.
    top_k: number of TEA entries (the policy's own K when None).
    window: sliding-window size (int or per axis); None predicts each view in one window.
    batch_size: windows per model call; the windows of all views are batched together.
    device: where to compute (default: the model's device); the result lives there.
    pad_to_window: allow a volume smaller than the window on some axis (zero-padded to it, then cropped); without
        it such a volume is an error.
    Returns TTAResult with probabilities (K, *S).
    """
    x = _as_image(image)
    dims = x.dim() - 1
    spatial = tuple(x.shape[1:])
    policy = _check_policy(policy)
    if policy is not None and policy.dims != dims:
        raise TTAError(
            f"the policy is for {policy.dims}D volumes but the image {tuple(x.shape)} is {dims}D (C, *S); use a "
            f"policy learned on {dims}D data"
        )
    if aggregate not in ("probabilities", "logits"):
        raise TTAError(f"aggregate must be 'probabilities' or 'logits', got {aggregate!r}")
    if spacing is not None and (len(spacing) != dims or min(spacing) <= 0):
        raise TTAError(f"spacing must give one positive mm size per spatial axis of {spatial}, got {tuple(spacing)}")
    win = _window(window, spatial)
    if win is not None and not pad_to_window and any(s < w for s, w in zip(spatial, win, strict=True)):
        raise TTAError(
            f"the volume {spatial} is smaller than the sliding window {win} on some axis; resample it, predict "
            "with a smaller window, or allow zero padding (pad_to_window=True, as `augsearch predict` does)"
        )
    device = _model_device(model, device)
    ids, weights = selected_views(policy, dims, top_k)
    pool = tea_pool(dims)
    views = len(ids)
    id_tensor = torch.tensor(ids, dtype=torch.long, device=device)

    # Enlarged grid: content that affine entries move outward stays on it; cropped again after inversion.
    before, after = view_padding(spatial, ids, dims, spacing)
    x = x.to(device)
    if any(before) or any(after):
        x = torch.nn.functional.pad(x, [p for axis in reversed(range(dims)) for p in (before[axis], after[axis])])
    batch = tea_apply(x.unsqueeze(0).expand(views, *x.shape).contiguous(), id_tensor, dims, spacing=spacing)
    net = model if policy is None else _OutputCheck(model, len(policy.label_names), dict(policy.label_names))
    output = "logits" if aggregate == "logits" else "probabilities"
    with _eval_mode(model):
        maps = sliding_window_predict(
            net, batch, win or tuple(batch.shape[2:]), overlap=overlap, batch_size=batch_size, output=output
        )
    del batch
    maps, valid = tea_invert(maps, id_tensor, dims, spacing=spacing)
    inner = (slice(None), slice(None)) + tuple(slice(b, b + n) for b, n in zip(before, spatial, strict=True))
    maps, valid = maps[inner], valid[inner]

    # Per-voxel weights (Z, 1, *S): the policy's, zeroed where a view is invalid, renormalised over the valid views;
    # a voxel no view covers keeps the plain policy weights.
    w = torch.tensor(weights, dtype=maps.dtype, device=maps.device).view(views, *([1] * (dims + 1)))
    voxel_w = w * valid.to(maps.dtype)
    total = voxel_w.sum(0, keepdim=True)
    voxel_w = torch.where(total > 0, voxel_w / total.clamp_min(_TINY), w.expand_as(voxel_w))
    aggregate_map = (voxel_w * maps).sum(0)
    probabilities = aggregate_map if aggregate == "probabilities" else torch.softmax(aggregate_map, dim=0)

    entropy = variance = view_volumes = None
    if return_uncertainty:
        view_probs = maps if aggregate == "probabilities" else torch.softmax(maps, dim=1)
        entropy = -(probabilities * probabilities.clamp_min(_TINY).log()).sum(0)
        foreground = 1 - view_probs[:, 0]  # (Z, *S)
        vw = voxel_w[:, 0]
        mean_fg = (vw * foreground).sum(0)
        variance = (vw * (foreground - mean_fg).square()).sum(0).clamp_min(0)
        # Each view's own labels where it is valid; the aggregate's where it is not.
        labels = torch.where(valid[:, 0], view_probs.argmax(1), probabilities.argmax(0).unsqueeze(0))
        voxel_mm3 = math.prod(float(s) for s in spacing) if spacing is not None else 1.0
        view_volumes = (labels != 0).flatten(1).sum(1).float() * voxel_mm3
    return TTAResult(
        probabilities=probabilities,
        entropy=entropy,
        variance=variance,
        views=[pool[i].name for i in ids],
        weights=weights,
        view_volumes=view_volumes,
    )
