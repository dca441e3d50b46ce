"""Context labels: the background split into t sub-classes for training, merged back into one for prediction.

Where the background is heterogeneous, a segmenter underfits it and its background logits cross the decision
boundary on unseen cases (over-segmentation). Training on K + t classes, the dataset's K labels plus t context
sub-classes K..K+t-1 that the background voxels move to, gives the background a richer representation (Li et al.,
"Context label learning", IEEE TMI 2023). Kinds (`loss.context_labels`):

- ``kmeans``: per sample, 1D k-means (t clusters) of the background voxels' intensity (mean over channels) on the
  augmented patch the segmenter sees; clusters are sorted by intensity, so sub-class K is always the darkest. Every
  background voxel moves to a cluster: class 0 gets no voxels.
- ``dilated``: one context class (t = 1): the background ring within `loss.context_dilation` voxels (a square or cube
  neighbourhood) of any foreground voxel; the rest stays class 0.
- ``organ``: one context class (t = 1): the voxels of the dataset label `loss.context_organ_label` are context, not a
  target, as the liver is for a tumour-only task in the paper. That label's own output is never a target, so it is
  never predicted; losses on the original labels (the outer loss of a meta-step) count its voxels as background.
- ``colab``: a generator network (augsearch/learn/colab.py) maps the image to a t-way softmax; each background voxel's
  target is that soft split over K..K+t-1, and the generator learns by meta-gradients.

Prediction merges in probability space: p_bg = p_0 + p_K + ... + p_{K+t-1} over the softmax of all K + t outputs.
`ContextMerged` returns logits whose softmax is exactly that merged distribution (the background logit is the
logsumexp of the background and context logits), so sliding windows, TTA, validation and the logit diagnostic keep
the dataset's K labels unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from augsearch.config import LossConfig
from augsearch.errors import AugsearchError

KINDS = ("kmeans", "dilated", "organ", "colab")
KMEANS_ITERATIONS = 10


class ContextLabelError(AugsearchError):
    """Context-label settings that do not fit the dataset, or tensors of the wrong shape."""


@dataclass(frozen=True)
class ContextSpec:
    """What a context-label model is: K task labels, t context sub-classes, and how training targets are made.

    Stored in checkpoints (`to_dict`), so prediction rebuilds the K + t head and merges it.
    """

    kind: str
    task_classes: int  # K, the dataset's labels
    context_classes: int  # t
    organ_value: int | None = None  # 'organ': the label value whose voxels are context
    dilation: int = 0  # 'dilated': ring width in voxels

    @property
    def total_classes(self) -> int:
        return self.task_classes + self.context_classes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContextSpec:
        try:
            spec = cls(kind=str(data["kind"]), task_classes=int(data["task_classes"]),
                       context_classes=int(data["context_classes"]),
                       organ_value=None if data.get("organ_value") is None else int(data["organ_value"]),
                       dilation=int(data.get("dilation", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise ContextLabelError(f"context settings {data!r} are malformed ({err}); expected kind, task_classes, "
                                    "context_classes") from None
        if spec.kind not in KINDS or spec.task_classes < 2 or spec.context_classes < 1:
            raise ContextLabelError(f"context settings {data!r}: expected kind in {KINDS}, task_classes >= 2 and "
                                    "context_classes >= 1")
        return spec


def context_spec(cfg: LossConfig, label_names: Mapping[str, int]) -> ContextSpec | None:
    """The run's context labels from `loss.*` and the dataset's labels; None for `context_labels = "none"`."""
    if cfg.context_labels == "none":
        return None
    organ_value = None
    if cfg.context_labels == "organ":
        name = cfg.context_organ_label
        if name not in label_names or label_names[name] == 0:
            raise ContextLabelError(
                f"loss.context_organ_label = {name!r} is not a foreground label of this dataset; use one of "
                f"{sorted((n for n, v in label_names.items() if v != 0), key=label_names.get)}")
        rare = cfg.rare_labels
        if rare is None:
            raise ContextLabelError(f"loss.context_labels = 'organ' needs loss.rare_labels naming the target rare "
                                    f"classes: left unset it marks every foreground label rare, {name!r} included, "
                                    "though a context label is no target")
        if name in rare:
            raise ContextLabelError(f"loss.context_organ_label = {name!r} is also in loss.rare_labels {rare}: a "
                                    "context label is no target; name another label or drop it from "
                                    "loss.rare_labels")
        if len([v for v in label_names.values() if v != 0]) < 2:
            raise ContextLabelError(f"loss.context_organ_label = {name!r} would leave no target label; 'organ' needs a "
                                    "dataset with another foreground label")
        organ_value = label_names[name]
    return ContextSpec(cfg.context_labels, max(label_names.values()) + 1, cfg.context_count, organ_value,
                       cfg.context_dilation if cfg.context_labels == "dilated" else 0)


def task_labels(spec: ContextSpec | None, labels: Tensor) -> Tensor:
    """Labels (B, *S) as the task sees them: with 'organ', the context label's voxels are background."""
    if spec is None or spec.organ_value is None:
        return labels
    return torch.where(labels == spec.organ_value, torch.zeros_like(labels), labels)


def task_foreground(spec: ContextSpec | None, fg_classes: list[int]) -> list[int]:
    """The foreground label values the task predicts (the context label of 'organ' is not one)."""
    if spec is None or spec.organ_value is None:
        return list(fg_classes)
    return [c for c in fg_classes if c != spec.organ_value]


def split_target(spec: ContextSpec, labels: Tensor, split: Tensor) -> Tensor:
    """Extended soft target (B, K + t, *S): foreground one-hot, background voxels spread over K..K+t-1 by `split`.

    labels (B, *S) int64; split (B, t, *S), non-negative and summing to 1 over t (gradients flow through it).
    """
    batch, *spatial = labels.shape
    if split.shape != (batch, spec.context_classes, *spatial):
        raise ContextLabelError(f"context split must be (B, t, *S) = {(batch, spec.context_classes, *spatial)}, got "
                                f"{tuple(split.shape)}")
    onehot = F.one_hot(labels.long(), spec.task_classes).movedim(-1, 1).to(split.dtype)
    background = onehot[:, :1]
    return torch.cat([torch.zeros_like(background), onehot[:, 1:], background * split], dim=1)


def hard_target(spec: ContextSpec, image: Tensor, labels: Tensor) -> Tensor:
    """Extended labels (B, *S) int64 in [0, K + t) for 'kmeans', 'dilated' and 'organ' (image (B, C, *S))."""
    if image.shape[0] != labels.shape[0] or image.shape[2:] != labels.shape[1:]:
        raise ContextLabelError(f"image (B, C, *S) and labels (B, *S) must agree, got {tuple(image.shape)} and "
                                f"{tuple(labels.shape)}")
    k = spec.task_classes
    background = labels == 0
    if spec.kind == "organ":
        return torch.where(labels == spec.organ_value, torch.full_like(labels, k), labels)
    if spec.kind == "dilated":
        ring = dilate(labels > 0, spec.dilation) & background
        return torch.where(ring, torch.full_like(labels, k), labels)
    if spec.kind == "kmeans":
        clusters = kmeans_background(image.mean(1), background, spec.context_classes)
        return torch.where(background, k + clusters, labels)
    raise ContextLabelError(f"context kind {spec.kind!r} has no fixed targets; 'colab' targets come from its generator")


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of mask (B, *S) bool by a (2 radius + 1)^d square or cube neighbourhood."""
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[mask.dim() - 1]
    return pool(mask.unsqueeze(1).float(), 2 * radius + 1, stride=1, padding=radius).squeeze(1) > 0


def kmeans_background(intensity: Tensor, background: Tensor, clusters: int) -> Tensor:
    """Per sample, 1D k-means of the background intensities into `clusters` groups, sorted by centre.

    intensity (B, *S) float, background (B, *S) bool. Returns (B, *S) int64 cluster indices (0 = darkest centre;
    voxels outside the background get the nearest cluster too, callers keep only the background's). Centres start at
    evenly spaced quantiles of the background and take KMEANS_ITERATIONS Lloyd steps.
    """
    out = torch.zeros(intensity.shape, dtype=torch.long, device=intensity.device)
    levels = (torch.arange(clusters, dtype=intensity.dtype, device=intensity.device) + 0.5) / clusters
    for b in range(intensity.shape[0]):
        values = intensity[b][background[b]]
        if values.numel() == 0:
            continue
        centres = torch.quantile(values.float(), levels.float()).to(values.dtype)
        for _ in range(KMEANS_ITERATIONS):
            nearest = (values[:, None] - centres[None]).abs().argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, nearest, values)
            counts = torch.bincount(nearest, minlength=clusters).to(values.dtype)
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        centres = centres.sort().values
        out[b] = (intensity[b].unsqueeze(-1) - centres).abs().argmin(-1)
    return out


def merge_probabilities(probs: Tensor, spec: ContextSpec) -> Tensor:
    """(B, K + t, *S) probabilities -> (B, K, *S): the context sub-classes' probabilities added to the background."""
    k = spec.task_classes
    return torch.cat([probs[:, :1] + probs[:, k:].sum(1, keepdim=True), probs[:, 1:k]], dim=1)


def merge_logits(logits: Tensor, spec: ContextSpec) -> Tensor:
    """(B, K + t, *S) logits -> (B, K, *S) logits whose softmax is `merge_probabilities(softmax(logits))`."""
    k = spec.task_classes
    if logits.shape[1] != spec.total_classes:
        raise ContextLabelError(f"a context-label model outputs K + t = {spec.total_classes} channels, got "
                                f"{logits.shape[1]}")
    background = torch.logsumexp(torch.cat([logits[:, :1], logits[:, k:]], dim=1), dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:k]], dim=1)


class ContextMerged(nn.Module):
    """A K + t segmenter seen as a K-class one: forward returns `merge_logits` of each output (a list under deep
    supervision in training mode). The wrapped model's parameters are this module's, so it trains and loads as one."""

    def __init__(self, model: nn.Module, spec: ContextSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        out = self.model(x)
        if isinstance(out, list):
            return [merge_logits(o, self.spec) for o in out]
        return merge_logits(out, self.spec)
