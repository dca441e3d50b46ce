"""Logit-shift diagnostic: per class, the true-class logit margin on training cases versus unseen cases.

Under class imbalance a segmenter overfits the rare class: its training voxels sit far on the correct side of the
decision boundary, while unseen rare-class voxels shift towards (and across) it; the frequent classes barely move
(Li, Kamnitsas, Glocker 2020). The quantity per voxel is the true-class margin

    margin = z_y - max_{c != y} z_c        (logits z (K,), label y; the voxel is misclassified iff margin < 0)

on whole volumes predicted with a sliding window (raw logits averaged over windows). Each class keeps a uniform
random subsample of at most `max_voxels` of its voxels over all cases (bottom-k of seeded random keys), so memory
stays bounded whatever the number of cases.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from augsearch.artifacts.checkpoint import Checkpoint
from augsearch.atomic import atomic_open
from augsearch.config import SplitConfig
from augsearch.data.cases import load_cases
from augsearch.data.dataset import Case, read_dataset_info
from augsearch.data.splits import resolve_splits
from augsearch.errors import AugsearchError
from augsearch.predict.sliding_window import sliding_window_predict


class InspectError(AugsearchError):
    """Bad input for the logit diagnostic."""


def voxel_margins(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """True-class margin z_y - max_{c != y} z_c per voxel: logits (K, *S), label (*S) int64 -> (*S) float32."""
    if logits.shape[0] < 2:
        raise InspectError(f"margins need at least 2 classes, got logits of shape {tuple(logits.shape)}")
    index = label.unsqueeze(0)
    true = logits.gather(0, index)[0]
    others = logits.scatter(0, index, float("-inf")).amax(dim=0)
    return (true - others).float()


def _bottom_k(keys: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k entries with the smallest keys (all of them when there are at most k)."""
    if keys.size <= k:
        return keys, values
    keep = np.argpartition(keys, k - 1)[:k]
    return keys[keep], values[keep]


def logit_margins(
    model: torch.nn.Module,
    cases: Sequence[Case],
    patch_size: Sequence[int],
    *,
    max_voxels: int = 20000,
    seed: int = 0,
    batch_size: int = 8,
    overlap: float = 0.5,
    device: torch.device | str | None = None,
) -> dict[int, np.ndarray]:
    """{label value: true-class margins (n,) float32} over the labelled voxels of `cases`.

    Every label value found in the cases' labels gets an entry; at most `max_voxels` margins per class, a uniform
    sample without replacement over all voxels of that class in all cases (seeded by `seed`). The model runs in
    eval mode on `device` (default: where its parameters are); images (C, *S) are moved there one case at a time.
    """
    if max_voxels < 1:
        raise InspectError(f"max_voxels must be >= 1, got {max_voxels}")
    if device is not None:
        model = model.to(device)
    model.eval()
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    rng = np.random.default_rng(seed)
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for case in cases:
        if case.label is None:
            raise InspectError(f"case {case.case_id} has no label; margins need labelled cases (imagesTr/labelsTr)")
        image = torch.from_numpy(np.ascontiguousarray(case.image)).unsqueeze(0).to(device)
        logits = sliding_window_predict(model, image, list(patch_size), overlap=overlap, batch_size=batch_size,
                                        output="logits")[0]
        if int(case.label.max()) >= logits.shape[0]:
            raise InspectError(
                f"case {case.case_id} has label {int(case.label.max())} but the model predicts "
                f"{logits.shape[0]} classes; use the dataset the checkpoint was trained on"
            )
        label = torch.from_numpy(case.label.astype(np.int64)).to(logits.device)
        margins = voxel_margins(logits, label).cpu().numpy().ravel()
        flat_label = case.label.ravel()
        for value in np.unique(flat_label).tolist():
            values = margins[flat_label == value]
            keys = rng.random(values.size)
            keys, values = _bottom_k(keys, values, max_voxels)
            if value in kept:
                keys = np.concatenate([kept[value][0], keys])
                values = np.concatenate([kept[value][1], values])
            kept[int(value)] = _bottom_k(keys, values, max_voxels)
    return {value: kept[value][1].astype(np.float32) for value in sorted(kept)}


def _summary(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "frac_across": math.nan, "n": 0}
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
        "frac_across": float(np.count_nonzero(values < 0) / values.size),
        "n": int(values.size),
    }


def shift_statistics(
    train_margins: Mapping[int, np.ndarray], unseen_margins: Mapping[int, np.ndarray]
) -> dict[int, dict[str, float]]:
    """Per class (union of both keys): summary of the margins on train and unseen voxels and their shift.

    Keys per class: train_mean, train_median, train_std, train_frac_across (share of margins < 0, i.e. wrongly
    classified), n_train, the same with `unseen_`, mean_shift = unseen_mean - train_mean, median_shift likewise.
    A class with no voxels on one side has NaN statistics there (and n = 0).
    """
    result: dict[int, dict[str, float]] = {}
    for cls in sorted(set(train_margins) | set(unseen_margins)):
        train = _summary(train_margins.get(cls, np.empty(0)))
        unseen = _summary(unseen_margins.get(cls, np.empty(0)))
        row: dict[str, float] = {}
        for side, stats in (("train", train), ("unseen", unseen)):
            for key in ("mean", "median", "std", "frac_across"):
                row[f"{side}_{key}"] = stats[key]
            row[f"n_{side}"] = stats["n"]
        row["mean_shift"] = unseen["mean"] - train["mean"]
        row["median_shift"] = unseen["median"] - train["median"]
        result[cls] = row
    return result


def plot_margins(
    train_margins: Mapping[int, np.ndarray],
    unseen_margins: Mapping[int, np.ndarray],
    out: str | Path,
    *,
    class_names: Mapping[int, str] | None = None,
    labels: tuple[str, str] = ("train", "unseen"),
    title: str | None = None,
    bins: int = 60,
) -> Path:
    """One panel per class: density histograms of the true-class margin, train vs unseen, boundary at 0 marked.

    Written atomically as PNG (the Agg canvas; no pyplot state). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = sorted(set(train_margins) | set(unseen_margins))
    if not classes:
        raise InspectError("no classes to plot: both margin tables are empty")
    stats = shift_statistics(train_margins, unseen_margins)
    names = dict(class_names or {})
    fig = Figure(figsize=(4.2 * len(classes), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(classes), squeeze=False)[0]
    for ax, cls in zip(axes, classes, strict=True):
        train = np.asarray(train_margins.get(cls, np.empty(0)), dtype=np.float64)
        unseen = np.asarray(unseen_margins.get(cls, np.empty(0)), dtype=np.float64)
        both = np.concatenate([train, unseen, [0.0]])
        # Shared bin edges keep the two densities comparable; the range always includes the boundary.
        edges = np.linspace(float(both.min()), float(both.max()) + 1e-6, bins + 1)
        for values, label, color in ((train, labels[0], "tab:blue"), (unseen, labels[1], "tab:red")):
            if values.size:
                ax.hist(values, bins=edges, density=True, alpha=0.5, color=color,
                        label=f"{label} (n={values.size}, {100 * np.mean(values < 0):.1f}% < 0)")
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1.0, label="decision boundary")
        s = stats[cls]
        ax.set_title(f"{names.get(cls, f'class {cls}')}: mean shift {s['mean_shift']:+.2f}")
        ax.set_xlabel("true-class logit margin  z_y - max_{c≠y} z_c")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    out = Path(out)
    with atomic_open(out, "wb") as handle:
        handle.write(buffer.getvalue())
    return out


def json_ready(value):
    """Replace NaN/inf floats by None (strict JSON) in nested dicts/lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


SPLITS = ("train", "val", "test")


def checkpoint_margins(
    ckpt: Checkpoint,
    dataset: str | Path,
    *,
    split: str | None = None,
    compare_split: str = "train",
    max_voxels: int = 20000,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict:
    """Margins of a loaded checkpoint on `compare_split` (reference) and `split` (unseen) cases of `dataset`.

    Splits are resolved with the checkpoint's own `data.split` config (train_fraction included, so "train" is the
    cases the model was trained on); `split=None` picks "test" when that split has cases, else "val".
    Returns {"split", "compare_split", "cases": {side: ids}, "class_names": {value: name}, "voxels": {side: {value:
    total voxel count}}, "train": {value: margins}, "unseen": {value: margins}} ("train" is the reference side).
    """

    for name, value in (("split", split), ("compare_split", compare_split)):
        if value is not None and value not in SPLITS:
            raise InspectError(f"{name} must be one of {list(SPLITS)}, got {value!r}")
    info = read_dataset_info(dataset)
    labels = ckpt.label_names
    if dict(info.labels) != labels:
        raise InspectError(
            f"dataset {dataset} has labels {dict(info.labels)} but the checkpoint was trained with {labels}; "
            "pass the dataset the checkpoint was trained on"
        )
    data_cfg = ckpt.config["data"]
    splits = resolve_splits(info, SplitConfig.model_validate(data_cfg.get("split", {})))
    if split is None:
        split = "test" if splits.test else "val"
    if split == compare_split:
        raise InspectError(f"--split and --compare-split must differ, both are {split!r}")
    ids = {"train": getattr(splits, compare_split), "unseen": getattr(splits, split)}
    for side, name in (("train", compare_split), ("unseen", split)):
        if not ids[side]:
            raise InspectError(
                f"the {name!r} split of {dataset} has no cases under the checkpoint's split config; pick another split"
            )
    preprocess = ckpt.preprocess
    model = ckpt.build_model().to(device)
    patch_size = ckpt.patch_size
    result: dict = {"split": split, "compare_split": compare_split, "cases": ids,
                    "class_names": {v: k for k, v in labels.items()}, "voxels": {}}
    for side in ("train", "unseen"):
        folder = splits.test_split if (split, compare_split)[side == "train"] == "test" else "Tr"
        cases = load_cases(info, ids[side], preprocess, data_cfg.get("cache_dir"), split=folder)
        counts = np.bincount(np.concatenate([c.label.ravel() for c in cases]).astype(np.int64))
        result["voxels"][side] = {v: int(n) for v, n in enumerate(counts) if n}
        result[side] = logit_margins(model, cases, patch_size, max_voxels=max_voxels, seed=seed,
                                     batch_size=batch_size)
    return result


def margin_report(margins: Mapping, **provenance) -> dict:
    """JSON-ready summary of `checkpoint_margins` output: per class name, shift statistics and total voxel counts."""
    stats = shift_statistics(margins["train"], margins["unseen"])
    names = margins["class_names"]
    classes = {}
    for value, row in stats.items():
        classes[names.get(value, str(value))] = {
            "label": value,
            **row,
            "voxels_train": margins["voxels"]["train"].get(value, 0),
            "voxels_unseen": margins["voxels"]["unseen"].get(value, 0),
        }
    return json_ready({**provenance, "split": margins["split"], "compare_split": margins["compare_split"],
                       "cases": margins["cases"], "margin": "z_y - max_{c != y} z_c", "classes": classes})
