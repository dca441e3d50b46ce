"""Preprocessing: resampling to the target spacing and intensity normalisation (per case and channel z-score, or CT
clip then global z-score with statistics measured on the training foreground), and the way back to the file's grid.

Normalisation "auto" (the default) follows dataset.json's channel names as nnU-Net does: CT when every channel is
named CT, else z-score; `complete_preprocess` resolves it and `describe_normalisation` says what was chosen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from augsearch.atomic import write_json
from augsearch.config import PreprocessConfig
from augsearch.data.dataset import Case, DatasetInfo, dataset_fingerprint
from augsearch.data.nifti import read_image, read_label
from augsearch.errors import DatasetError

# preprocessing


def _zoom_to(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample the trailing spatial axes of `array` to `shape` (corner-aligned grids)."""
    from scipy import ndimage

    spatial = array.shape[-len(shape):]
    if tuple(spatial) == tuple(shape):
        return array
    factors = [t / s for t, s in zip(shape, spatial)]
    if array.ndim == len(shape):
        return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=False)
    return np.stack([ndimage.zoom(a, factors, order=order, mode="nearest", grid_mode=False) for a in array])


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def normalize_image(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(C, *S) -> (C, *S) float32: per-channel z-score, CT clip + global mean/std, or unchanged."""
    if cfg.normalization == "auto":
        raise DatasetError("data.preprocess.normalization", "a resolved scheme (zscore, ct or none)", "'auto'",
                           "pass the config through complete_preprocess() with the dataset, which reads the channel "
                           "names, or set the scheme explicitly")
    if cfg.normalization == "none":
        return image.astype(np.float32)
    if cfg.normalization == "ct":
        if cfg.ct_clip is None or cfg.ct_mean is None or cfg.ct_std is None:
            raise DatasetError("data.preprocess", "ct_clip, ct_mean and ct_std for normalization='ct'",
                               f"ct_clip={cfg.ct_clip}, ct_mean={cfg.ct_mean}, ct_std={cfg.ct_std}",
                               "set them, or pass the config through complete_preprocess() to measure them")
        low, high = cfg.ct_clip
        return ((np.clip(image, low, high) - cfg.ct_mean) / max(cfg.ct_std, 1e-8)).astype(np.float32)
    axes = tuple(range(1, image.ndim))
    mean = image.mean(axis=axes, keepdims=True)
    std = image.std(axis=axes, keepdims=True)
    return ((image - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def preprocess_image(image: np.ndarray, spacing: tuple[float, ...], cfg: PreprocessConfig
                     ) -> tuple[np.ndarray, tuple[float, ...]]:
    """Normalise, then resample `(C, *S)` linearly to `cfg.target_spacing` -> (image, new spacing)."""
    image = normalize_image(image, cfg)
    if cfg.target_spacing is None:
        return image, tuple(spacing)
    target = _target_spacing(cfg, len(spacing))
    shape = target_shape(image.shape[1:], spacing, target)
    return _zoom_to(image, shape, order=1).astype(np.float32), target


def resample_label(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a `(*S)` label map to `shape`."""
    return _zoom_to(label, tuple(shape), order=0).astype(label.dtype)


def restore_to_original(prob_or_label: np.ndarray, case: Case) -> np.ndarray:
    """Map a prediction on the preprocessed grid back to the file's grid.

    `(K, *S)` probabilities are resampled linearly and renormalised to sum to 1; a `(*S)` label map by nearest
    neighbour. Returns `(K, *original_shape)` or `(*original_shape)`.
    """
    arr = np.asarray(prob_or_label)
    dims = len(case.original_shape)
    if arr.ndim == dims:
        return resample_label(arr, case.original_shape)
    if arr.ndim != dims + 1:
        raise DatasetError(case.case_id, f"a (K, *S) probability map or a (*S) label map with {dims} spatial axes",
                           f"shape {arr.shape}", "pass the prediction of this case")
    out = _zoom_to(arr.astype(np.float32), case.original_shape, order=1)
    out = np.clip(out, 0, None)
    return out / np.maximum(out.sum(axis=0, keepdims=True), 1e-8)


def _target_spacing(cfg: PreprocessConfig, dims: int) -> tuple[float, ...]:
    target = tuple(float(s) for s in cfg.target_spacing)
    if len(target) != dims:
        raise DatasetError("data.preprocess.target_spacing", f"{dims} values (one per spatial axis)",
                           f"{list(target)}", f"give {dims} spacings in mm")
    return target


def ct_statistics(info: DatasetInfo, case_ids: list[str], clip_percentiles=(0.5, 99.5)) -> dict[str, Any]:
    """nnU-Net CT statistics from foreground voxels of labelled cases (first channel): percentile clip window, then
    mean and std of the clipped values."""
    values = []
    for case_id in case_ids:
        image, _, _, _ = read_image(info.image_files(case_id), info.dims)
        label, _, _ = read_label(info.label_file(case_id), info.dims, info.labels)
        values.append(image[0][label > 0])
    fg = np.concatenate(values) if values else np.zeros(1, np.float32)
    if fg.size == 0:
        raise DatasetError(info.root / "labelsTr", "foreground voxels to measure CT statistics on",
                           f"only background in all {len(case_ids)} label maps",
                           "check the label files with `augsearch data check`")
    low, high = np.percentile(fg, clip_percentiles)
    clipped = np.clip(fg, low, high)
    return {"ct_clip": [float(low), float(high)], "ct_mean": float(clipped.mean()), "ct_std": float(clipped.std())}


def complete_preprocess(info: DatasetInfo, cfg: PreprocessConfig, cache_dir: str | Path | None = None
                        ) -> PreprocessConfig:
    """`cfg` with normalization 'auto' resolved from the channel names (CT if every channel is CT, else zscore) and
    missing CT statistics (normalization='ct') measured on all labelled cases; others unchanged.

    The measurement is cached in `cache_dir` under the dataset fingerprint. Keep the returned config with the model,
    so that prediction normalises with the same numbers.
    """
    if cfg.normalization == "auto":
        all_ct = all(name.strip().upper() == "CT" for name in info.channel_names)
        cfg = cfg.model_copy(update={"normalization": "ct" if all_ct else "zscore"})
    missing = {k: None for k in ("ct_clip", "ct_mean", "ct_std") if getattr(cfg, k) is None}
    if cfg.normalization != "ct" or not missing:
        return cfg
    stats_path = Path(cache_dir) / f"ct_stats.{dataset_fingerprint(info)[:20]}.json" if cache_dir else None
    if stats_path is not None and stats_path.is_file():
        stats = json.loads(stats_path.read_text())
    else:
        stats = ct_statistics(info, info.training)
        if stats_path is not None:
            write_json(stats_path, stats)
    return cfg.model_copy(update={k: stats[k] for k in missing})


def describe_normalisation(cfg: PreprocessConfig, channel_names: list[str]) -> str:
    """One line per channel saying how it is normalised, e.g. `channel 0 (CT): CT clip [-100, 240] HU, ...`."""
    lines = []
    for index, name in enumerate(channel_names):
        if cfg.normalization == "ct":
            low, high = cfg.ct_clip or (float("nan"), float("nan"))
            how = (f"CT: clip to [{low:g}, {high:g}], then (x - {cfg.ct_mean:g}) / {cfg.ct_std:g} (training "
                   "foreground statistics)")
        elif cfg.normalization == "zscore":
            how = "z-score per case (its own mean and standard deviation)"
        else:
            how = {"none": "none (intensities as stored)", "auto": "auto (not resolved yet)"}[cfg.normalization]
        lines.append(f"channel {index} ({name}): {how}")
    return "; ".join(lines)
