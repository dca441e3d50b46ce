"""Sliding-window prediction of whole volumes with a patch-based segmenter.

The volume is tiled with windows of the training patch size at step `window * (1 - overlap)` per axis; the tile
starts are spread evenly so the first window touches the start and the last one the end of every axis (nnU-Net).
Volumes smaller than the window on some axis are zero-padded (symmetrically) up to the window, as nnU-Net does on
normalised images, and the padding is cropped from the result. Windows of every image in the batch are gathered
into mini-batches of `batch_size`, moved to the model's device, predicted, and accumulated back on the image's
device, weighted by an importance map (a Gaussian with sigma = window / 8 per axis, or constant), then divided by
the accumulated weight.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from torch import Tensor, nn

from augsearch.errors import AugsearchError


class InferenceError(AugsearchError):
    """Bad arguments for sliding-window prediction."""


def importance_map(window: tuple[int, ...], kind: str = "gaussian", *, device=None) -> Tensor:
    """Per-voxel window weights (*window) float32, maximum 1, strictly positive.

    "gaussian": product over axes of exp(-(i - (w-1)/2)^2 / (2 sigma^2)), sigma = w / 8; "constant": ones.
    """
    if kind == "constant":
        return torch.ones(window, device=device)
    if kind != "gaussian":
        raise InferenceError(f"importance must be 'gaussian' or 'constant', got {kind!r}")
    weights = torch.ones((), device=device, dtype=torch.float64)
    for axis, size in enumerate(window):
        coords = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
        profile = torch.exp(-coords.square() / (2 * (size / 8) ** 2))
        shape = [1] * len(window)
        shape[axis] = size
        weights = weights * profile.reshape(shape)
    weights = weights / weights.max()
    # float32 must never hold an exact zero weight (corners of large 3D windows), or those voxels would divide by 0.
    return weights.clamp_min(1e-6).float()


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Evenly spread starts covering [0, size): first 0, last size - window, spacing at most `step`."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / step) + 1
    return [round(i * (size - window) / (count - 1)) for i in range(count)]


def _model_device_dtype(model: nn.Module, image: Tensor) -> tuple[torch.device, torch.dtype]:
    param = next(iter(model.parameters()), None)
    if param is None:
        return image.device, image.dtype if image.is_floating_point() else torch.float32
    return param.device, param.dtype


def sliding_window_predict(
    model: nn.Module,
    image: Tensor,
    window: tuple[int, ...] | list[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 8,
    importance: Literal["gaussian", "constant"] = "gaussian",
    num_classes: int | None = None,
    output: Literal["probabilities", "logits"] = "probabilities",
) -> Tensor:
    """Predict image (B, C, *S) window by window; returns (B, K, *S) float32 on the image's device.

    `model` maps (N, C, *window) -> (N, K, *window) (a list output, as from deep supervision, uses its first
    entry); its mode (train/eval) is left as the caller set it. "probabilities" averages softmax outputs,
    "logits" averages raw logits. `num_classes`, when given, is checked against the model output.
    """
    window = tuple(int(w) for w in window)
    dims = image.dim() - 2
    if dims < 1 or len(window) != dims or min(window) < 1:
        raise InferenceError(
            f"window must give one positive size per spatial axis of image {tuple(image.shape)} (B, C, *S), "
            f"got {window}"
        )
    if not 0 <= overlap < 1:
        raise InferenceError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
    if output not in ("probabilities", "logits"):
        raise InferenceError(f"output must be 'probabilities' or 'logits', got {output!r}")
    weights = importance_map(window, importance, device=image.device)

    spatial = tuple(image.shape[2:])
    pad_before = [max(w - s, 0) // 2 for s, w in zip(spatial, window, strict=True)]
    pad_after = [max(w - s, 0) - b for s, w, b in zip(spatial, window, pad_before, strict=True)]
    if any(pad_before) or any(pad_after):
        # F.pad lists pads from the last axis backwards.
        pads = [p for axis in reversed(range(dims)) for p in (pad_before[axis], pad_after[axis])]
        image = torch.nn.functional.pad(image, pads)
    padded = tuple(image.shape[2:])
    steps = [max(1, int(w * (1 - overlap))) for w in window]
    starts = [window_starts(s, w, st) for s, w, st in zip(padded, window, steps, strict=True)]
    tiles = [
        (b, tuple(slice(o, o + w) for o, w in zip(origin, window, strict=True)))
        for b in range(image.shape[0])
        for origin in itertools.product(*starts)
    ]

    device, dtype = _model_device_dtype(model, image)
    total = None
    norm = torch.zeros(padded, device=image.device)
    with torch.no_grad():
        for first in range(0, len(tiles), batch_size):
            chunk = tiles[first : first + batch_size]
            x = torch.stack([image[(b, slice(None), *sl)] for b, sl in chunk]).to(device=device, dtype=dtype)
            pred = model(x)
            if isinstance(pred, (list, tuple)):
                pred = pred[0]
            if pred.shape[0] != len(chunk) or tuple(pred.shape[2:]) != window:
                raise InferenceError(
                    f"model must map (N, C, *window) -> (N, K, *window); for input {tuple(x.shape)} it returned "
                    f"{tuple(pred.shape)}"
                )
            if num_classes is not None and pred.shape[1] != num_classes:
                raise InferenceError(f"num_classes={num_classes} but the model returned {pred.shape[1]} channels")
            if output == "probabilities":
                pred = torch.softmax(pred.float(), dim=1)
            pred = pred.float().to(image.device) * weights
            if total is None:
                total = torch.zeros((image.shape[0], pred.shape[1], *padded), device=image.device)
            for (b, sl), p in zip(chunk, pred, strict=True):
                total[(b, slice(None), *sl)] += p
                if b == 0:
                    norm[sl] += weights
    result = total / norm
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial, strict=True))
    return result[(slice(None), slice(None), *crop)]


def predict_volume_labels(model: nn.Module, image: Tensor, window: tuple[int, ...] | list[int], **kwargs) -> Tensor:
    """Argmax labels (B, *S) int64 of `sliding_window_predict(model, image, window, **kwargs)`."""
    return sliding_window_predict(model, image, window, **kwargs).argmax(dim=1)
