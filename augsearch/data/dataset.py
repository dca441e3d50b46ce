"""Medical Segmentation Decathlon / nnU-Net raw datasets: dataset.json, NIfTI volumes, preprocessing, cache, splits.

Layout under a dataset root:
    dataset.json            labels (nnU-Net v2 `{"background": 0, ...}` or MSD `{"0": "background", ...}`),
                            `channel_names` (v2) or `modality` (MSD), `file_ending` (default ".nii.gz")
    imagesTr/ labelsTr/     training images and labels; imagesTs/ unlabelled test images (optional)
    splits.json             optional `{"train": [...], "val": [...], "test": [...]}` (the bundled benchmark writes it)
A case's channels are either separate files `<case>_0000<ending>`, `<case>_0001<ending>`, ... (nnU-Net v2) or one
file `<case><ending>` whose last axis holds the channels when it has one more axis than the spatial dims (MSD 4D).

Spatial dims (2 or 3) come from dataset.json: `"dims"`, else `tensorImageSize` ("2D" -> 2, "3D"/"4D" -> 3), else the
first training image: a file of 2 axes, or of 3 axes whose last has size 1, is 2D; anything else is 3D. A 2D case may
be stored with 2 axes or with a singleton third axis; the singleton axis is dropped in memory.

In memory an image is `(C, *S)` float32 channel-first with S in NIfTI voxel order, a label `(*S)` uint8.
Preprocessing: normalise intensities (per case and channel z-score, or CT clip then global mean/std), then resample
to the target spacing (images linear, labels nearest). Preprocessed arrays are cached as .npy files keyed by the
case id, the preprocessing settings and the source files' sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from augsearch.atomic import atomic_open, write_json
from augsearch.config import PreprocessConfig, SplitConfig
from augsearch.errors import AugsearchError

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_CACHE_VERSION = 1


class DatasetError(AugsearchError):
    """A dataset that does not fit the expected layout; carries the file, what was expected, what came, the fix."""

    def __init__(self, file: str | Path, expected: str, found: str, fix: str):
        self.file, self.expected, self.found, self.fix = str(file), expected, found, fix
        super().__init__(f"{file}: expected {expected}, found {found}. Fix: {fix}")


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    name: str
    labels: dict[str, int]
    channel_names: list[str]
    file_ending: str
    dims: int
    training: list[str]  # case ids with image + label
    test: list[str]  # case ids in imagesTs

    def image_files(self, case_id: str, split: str = "Tr") -> list[Path]:
        """Channel files of one case: `[<case><ending>]` (MSD) or `[<case>_0000<ending>, ...]` (nnU-Net v2)."""
        folder = self.root / f"images{split}"
        single = folder / f"{case_id}{self.file_ending}"
        if single.exists():
            return [single]
        return [folder / f"{case_id}_{c:04d}{self.file_ending}" for c in range(len(self.channel_names))]

    def label_file(self, case_id: str) -> Path:
        return self.root / "labelsTr" / f"{case_id}{self.file_ending}"


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # (C, *S) float32, preprocessed (resampled + normalised)
    label: np.ndarray | None  # (*S) uint8 on the preprocessed grid
    spacing: tuple[float, ...]  # preprocessed spacing (mm), len == dims
    original_spacing: tuple[float, ...]
    original_shape: tuple[int, ...]  # spatial shape on disk
    affine: np.ndarray  # 4x4 affine of the file on disk


@dataclass
class Splits:
    train: list[str]
    val: list[str]
    test: list[str]


# ---------------------------------------------------------------------------------------------------------------
# dataset.json and folder scanning


def read_dataset_json(root: str | Path) -> dict[str, Any]:
    """Parse `root/dataset.json`; DatasetError when the folder or the file is missing or not JSON."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "a dataset folder", "no such folder",
                           "point data.root at a folder holding dataset.json, or set data.synth to generate one")
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(path, "a dataset.json file", "no such file",
                           "add dataset.json (nnU-Net v2 or MSD format) or generate one with `augsearch data synth`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(path, "valid JSON", f"a parse error ({err})", "repair the file") from None
    if not isinstance(meta, dict):
        raise DatasetError(path, "a JSON object", type(meta).__name__, "write dataset.json as an object")
    return meta


def parse_labels(meta: dict[str, Any], path: Path) -> dict[str, int]:
    """`labels` as name -> int from either the nnU-Net v2 (name -> int) or the MSD ("int" -> name) form."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(path, "a non-empty `labels` object", repr(raw),
                           'add e.g. "labels": {"background": 0, "organ": 1}')
    if all(isinstance(k, str) and k.strip().lstrip("-").isdigit() for k in raw) and all(
            isinstance(v, str) for v in raw.values()):
        labels = {str(name): int(key) for key, name in raw.items()}
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        labels = {str(k): int(v) for k, v in raw.items()}
    else:
        raise DatasetError(path, "labels as name -> int (nnU-Net v2) or \"int\" -> name (MSD)", repr(raw),
                           "use one of the two forms; region-based labels (lists) are not supported")
    values = sorted(labels.values())
    if 0 not in values or len(set(values)) != len(values) or min(values) < 0 or max(values) > 255:
        raise DatasetError(path, "distinct label values in 0..255 including 0 (background)", repr(labels),
                           "give every class its own integer and background the value 0")
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def parse_channel_names(meta: dict[str, Any], path: Path) -> list[str]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(path, "a non-empty `channel_names` (or MSD `modality`) object", repr(raw),
                           'add e.g. "channel_names": {"0": "CT"}')
    try:
        keys = sorted(int(k) for k in raw)
    except ValueError:
        raise DatasetError(path, 'channel keys "0", "1", ...', repr(list(raw)), "number the channels from 0") from None
    if keys != list(range(len(keys))):
        raise DatasetError(path, f"channel keys 0..{len(keys) - 1}", repr(keys), "number the channels 0, 1, 2 ...")
    return [str(raw[str(k)]) for k in keys]


def scan_images(folder: Path, file_ending: str) -> dict[str, list[Path]]:
    """Case id -> files in an images folder: `_NNNN` channel suffixes grouped, other names one file per case."""
    cases: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not name.endswith(file_ending) or not path.is_file():
            continue
        stem = name[: -len(file_ending)]
        match = _CHANNEL_SUFFIX.match(stem)
        cases.setdefault(match.group("case") if match else stem, []).append(path)
    return cases


def missing_channel_files(info_root: Path, split: str, case_id: str, files: list[Path], n_channels: int,
                          file_ending: str) -> list[Path]:
    """Expected channel files of a `_NNNN`-suffixed case that are absent (empty for single-file cases)."""
    if len(files) == 1 and files[0].name == f"{case_id}{file_ending}":
        return []
    folder = info_root / f"images{split}"
    expected = [folder / f"{case_id}_{c:04d}{file_ending}" for c in range(n_channels)]
    return [p for p in expected if p not in files]


def infer_dims(meta: dict[str, Any], first_image: Path | None) -> int:
    if meta.get("dims") in (2, 3):
        return int(meta["dims"])
    size = str(meta.get("tensorImageSize", "")).upper()
    if size == "2D":
        return 2
    if size in ("3D", "4D"):
        return 3
    if first_image is None:
        return 3
    shape = _load_nifti(first_image).shape
    return 2 if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else 3


def read_dataset_info(root: str | Path) -> DatasetInfo:
    """Read dataset.json and list the cases; DatasetError on a missing folder, image without label or channel."""
    root = Path(root)
    meta = read_dataset_json(root)
    path = root / "dataset.json"
    labels = parse_labels(meta, path)
    channels = parse_channel_names(meta, path)
    file_ending = str(meta.get("file_ending", ".nii.gz"))
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).is_dir():
            raise DatasetError(root / sub, "a folder of training files", "no such folder",
                               f"create {sub}/ with one file per case (see dataset.json file_ending {file_ending})")
    images = scan_images(root / "imagesTr", file_ending)
    if not images:
        raise DatasetError(root / "imagesTr", f"training images ending in {file_ending}", "none",
                           "add images or fix `file_ending` in dataset.json")
    for case_id, files in images.items():
        missing = missing_channel_files(root, "Tr", case_id, files, len(channels), file_ending)
        if missing:
            raise DatasetError(missing[0], f"{len(channels)} channel file(s) for case {case_id}",
                               f"{len(files)}: {[p.name for p in files]}", "add the missing channel file")
        label = root / "labelsTr" / f"{case_id}{file_ending}"
        if not label.is_file():
            raise DatasetError(label, f"the label of training image {files[0].name}", "no such file",
                               "add the label or move the image to imagesTs/")
    test: dict[str, list[Path]] = {}
    if (root / "imagesTs").is_dir():
        test = scan_images(root / "imagesTs", file_ending)
        for case_id, files in test.items():
            missing = missing_channel_files(root, "Ts", case_id, files, len(channels), file_ending)
            if missing:
                raise DatasetError(missing[0], f"{len(channels)} channel file(s) for test case {case_id}",
                                   f"{len(files)}", "add the missing channel file")
    first = next(iter(images.values()))[0]
    return DatasetInfo(root=root, name=str(meta.get("name", root.name)), labels=labels, channel_names=channels,
                       file_ending=file_ending, dims=infer_dims(meta, first), training=sorted(images),
                       test=sorted(test))


# ---------------------------------------------------------------------------------------------------------------
# NIfTI reading


def _load_nifti(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise DatasetError(path, "a NIfTI file", "no such file", "add the file or remove the case")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for broken headers
        raise DatasetError(path, "a readable NIfTI file", f"{type(err).__name__}: {err}",
                           "re-export the volume; the file is corrupt or not NIfTI") from None


def _read_data(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray, Any]:
    img = _load_nifti(path)
    try:
        data = np.asarray(img.dataobj)
    except Exception as err:  # truncated gzip streams, short files
        raise DatasetError(path, "readable voxel data", f"{type(err).__name__}: {err}",
                           "re-export the volume; the file is truncated or corrupt") from None
    zooms = tuple(float(z) for z in img.header.get_zooms())
    return data, zooms, np.asarray(img.affine, dtype=np.float64), img.header


def _to_channel_first(data: np.ndarray, zooms: tuple[float, ...], dims: int, path: Path) -> tuple[np.ndarray, tuple]:
    """(X, Y[, 1]) / (X, Y, Z) / (X, Y[, 1], C) / (X, Y, Z, C) on disk -> (C, *S), spacing of the spatial axes."""
    if dims == 2:
        if data.ndim == 2:
            arr = data[None]
        elif data.ndim == 3 and data.shape[2] == 1:
            arr = data[None, :, :, 0]
        elif data.ndim == 3:
            arr = np.moveaxis(data, 2, 0)
        elif data.ndim == 4 and data.shape[2] == 1:
            arr = np.moveaxis(data[:, :, 0], 2, 0)
        else:
            raise DatasetError(path, "a 2D image (X, Y), (X, Y, 1) or with channels (X, Y, C)", f"shape {data.shape}",
                               "store 2D cases with two spatial axes, or set dims in dataset.json")
    else:
        if data.ndim == 3:
            arr = data[None]
        elif data.ndim == 4:
            arr = np.moveaxis(data, 3, 0)
        else:
            raise DatasetError(path, "a 3D image (X, Y, Z) or (X, Y, Z, C)", f"shape {data.shape}",
                               "store 3D cases with three spatial axes, channels last")
    spacing = tuple(zooms[:dims]) if len(zooms) >= dims else tuple(zooms) + (1.0,) * (dims - len(zooms))
    return arr, spacing


def read_image(path_or_paths: str | Path | list, dims: int | None = None
               ) -> tuple[np.ndarray, tuple[float, ...], np.ndarray, Any]:
    """Read one image: a single file (possibly MSD 4D) or a list of `_NNNN` channel files.

    Returns `(image (C, *S) float32, spacing (dims,), affine (4, 4), header)` of the first file. `dims=None` infers
    the spatial dims from the file (2 axes or a singleton third axis -> 2D).
    """
    paths = [Path(p) for p in ([path_or_paths] if isinstance(path_or_paths, (str, Path)) else path_or_paths)]
    channels, spacing, affine, header = [], None, None, None
    for path in paths:
        data, zooms, aff, hdr = _read_data(path)
        if dims is None:
            dims = 2 if data.ndim == 2 or (data.ndim == 3 and data.shape[2] == 1) else 3
        arr, sp = _to_channel_first(data, zooms, dims, path)
        if spacing is None:
            spacing, affine, header = sp, aff, hdr
        elif arr.shape[1:] != channels[0].shape[1:] or not np.allclose(sp, spacing, rtol=1e-3):
            raise DatasetError(path, f"the shape {channels[0].shape[1:]} and spacing {spacing} of {paths[0].name}",
                               f"shape {arr.shape[1:]}, spacing {sp}", "resample every channel onto one grid")
        elif not np.allclose(aff, affine, rtol=1e-3, atol=1e-3):
            raise DatasetError(path, f"the affine (origin/direction) of {paths[0].name}", "a different affine",
                               "register the channels and write them with one header")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DatasetError(path, "finite voxel values", f"{bad} NaN/inf voxels",
                               "replace the non-finite voxels (e.g. with the background value) and re-save")
        channels.append(arr)
    return np.concatenate(channels, axis=0).astype(np.float32, copy=False), spacing, affine, header


def read_label(path: str | Path, dims: int, labels: dict[str, int]) -> tuple[np.ndarray, tuple, np.ndarray]:
    """Read a label file -> `(label (*S) uint8, spacing, affine)`; values must be in dataset.json `labels`."""
    path = Path(path)
    data, zooms, affine, _ = _read_data(path)
    arr, spacing = _to_channel_first(data, zooms, dims, path)
    if arr.shape[0] != 1:
        raise DatasetError(path, "a single-channel label map", f"{arr.shape[0]} channels", "store one label map")
    arr = arr[0]
    if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
        raise DatasetError(path, "integer label values", "non-integer or non-finite values",
                           "store labels as integers (uint8)")
    values = set(np.unique(arr).astype(int).tolist())
    unknown = sorted(values - set(labels.values()))
    if unknown:
        raise DatasetError(path, f"label values in dataset.json {sorted(labels.values())}", f"values {unknown}",
                           "add the classes to dataset.json `labels` or fix the label map")
    return arr.astype(np.uint8), spacing, affine


def check_pair(image_path: Path, label_path: Path, image_shape: tuple, image_spacing: tuple, image_affine: np.ndarray,
               label_shape: tuple, label_spacing: tuple, label_affine: np.ndarray) -> list[DatasetError]:
    """Grid agreement of an image and its label: shape, spacing, affine (origin and direction)."""
    errors = []
    if tuple(image_shape) != tuple(label_shape):
        errors.append(DatasetError(label_path, f"the spatial shape of {image_path.name} {tuple(image_shape)}",
                                   f"shape {tuple(label_shape)}", "resample the label onto the image grid"))
    elif not np.allclose(image_spacing, label_spacing, rtol=1e-3, atol=1e-5):
        errors.append(DatasetError(label_path, f"the spacing of {image_path.name} {tuple(image_spacing)}",
                                   f"spacing {tuple(label_spacing)}", "write the label with the image's header"))
    elif not np.allclose(image_affine, label_affine, rtol=1e-3, atol=1e-3):
        errors.append(DatasetError(label_path, f"the affine of {image_path.name} (origin/direction)",
                                   "a different affine", "write the label with the image's header/affine"))
    return errors


# ---------------------------------------------------------------------------------------------------------------
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
    low, high = np.percentile(fg, clip_percentiles)
    clipped = np.clip(fg, low, high)
    return {"ct_clip": [float(low), float(high)], "ct_mean": float(clipped.mean()), "ct_std": float(clipped.std())}


def complete_preprocess(info: DatasetInfo, cfg: PreprocessConfig, cache_dir: str | Path | None = None
                        ) -> PreprocessConfig:
    """`cfg` with missing CT statistics (normalization='ct') measured on all labelled cases; others unchanged.

    The measurement is cached in `cache_dir` under the dataset fingerprint. Keep the returned config with the model,
    so that prediction normalises with the same numbers.
    """
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


# ---------------------------------------------------------------------------------------------------------------
# loading with cache


def _cache_key(info: DatasetInfo, case_id: str, files: list[Path], cfg: PreprocessConfig) -> str:
    stats = []
    for path in files:
        st = os.stat(path)
        stats.append([path.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_VERSION, case_id, info.dims, info.channel_names, cfg.model_dump(mode="json"), stats],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_case(info: DatasetInfo, case_id: str, preprocess: PreprocessConfig, split: str = "Tr") -> Case:
    """Read and preprocess one case from disk (no cache)."""
    files = info.image_files(case_id, split)
    image, spacing, affine, _ = read_image(files, info.dims)
    label = None
    if split == "Tr":
        label_path = info.label_file(case_id)
        label, label_spacing, label_affine = read_label(label_path, info.dims, info.labels)
        errors = check_pair(files[0], label_path, image.shape[1:], spacing, affine, label.shape, label_spacing,
                            label_affine)
        if errors:
            raise errors[0]
    original_shape = tuple(int(n) for n in image.shape[1:])
    pre, new_spacing = preprocess_image(image, spacing, preprocess)
    if label is not None:
        label = resample_label(label, pre.shape[1:])
    return Case(case_id=case_id, image=pre, label=label, spacing=tuple(float(s) for s in new_spacing),
                original_spacing=tuple(float(s) for s in spacing), original_shape=original_shape, affine=affine)


def load_cases(info: DatasetInfo, case_ids: list[str], preprocess: PreprocessConfig,
               cache_dir: str | Path | None = None, split: str = "Tr") -> list[Case]:
    """Preprocessed cases, read from `cache_dir` when an entry matches (no NIfTI read), else from disk and cached.

    `split` is "Tr" (image + label) or "Ts" (image only, label None). `cache_dir=None` disables caching. Missing CT
    statistics are measured first (`complete_preprocess`).
    """
    preprocess = complete_preprocess(info, preprocess, cache_dir)
    known = set(info.training if split == "Tr" else info.test)
    unknown = [c for c in case_ids if c not in known]
    if unknown:
        raise DatasetError(info.root / f"images{split}", f"case ids present in images{split}", f"unknown {unknown[:5]}",
                           f"use ids such as {sorted(known)[:3]}")
    cases = []
    for case_id in case_ids:
        if cache_dir is None:
            cases.append(load_case(info, case_id, preprocess, split))
            continue
        cache = Path(cache_dir)
        files = info.image_files(case_id, split) + ([info.label_file(case_id)] if split == "Tr" else [])
        stem = cache / f"{case_id}.{split}.{_cache_key(info, case_id, files, preprocess)}"
        case = _read_cache(stem, case_id)
        if case is None:
            case = load_case(info, case_id, preprocess, split)
            _write_cache(stem, case)
        cases.append(case)
    return cases


def _write_cache(stem: Path, case: Case) -> None:
    with atomic_open(f"{stem}.image.npy") as fh:
        np.save(fh, case.image)
    if case.label is not None:
        with atomic_open(f"{stem}.label.npy") as fh:
            np.save(fh, case.label)
    # The JSON is written last: its presence marks a complete entry.
    write_json(f"{stem}.json", {"spacing": case.spacing, "original_spacing": case.original_spacing,
                                "original_shape": case.original_shape, "affine": case.affine.tolist(),
                                "has_label": case.label is not None})


def _read_cache(stem: Path, case_id: str) -> Case | None:
    meta_path = Path(f"{stem}.json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        image = np.load(f"{stem}.image.npy")
        label = np.load(f"{stem}.label.npy") if meta["has_label"] else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # a damaged entry is rebuilt from the NIfTI files
    return Case(case_id=case_id, image=image, label=label, spacing=tuple(meta["spacing"]),
                original_spacing=tuple(meta["original_spacing"]), original_shape=tuple(meta["original_shape"]),
                affine=np.asarray(meta["affine"], dtype=np.float64))


# ---------------------------------------------------------------------------------------------------------------
# splits and fingerprint


def resolve_splits(info: DatasetInfo, cfg: SplitConfig) -> Splits:
    """Train/val/test case ids per `SplitConfig` precedence, then a seeded `train_fraction` subset of train.

    Explicit lists: `train` defaults to every labelled case not named in val/test. nnU-Net `splits_final.json`
    (relative paths are under the dataset root): fold `fold` gives train/val, test = labelled cases in neither.
    Benchmark `splits.json`: used as written. Else a seeded shuffle: `val_fraction` (at least 1 case) to val, the rest
    to train, test empty. The subset keeps `max(1, round(train_fraction * n))` cases, in their original order.
    """
    training = list(info.training)
    if cfg.train is not None or cfg.val is not None or cfg.test is not None:
        val, test = list(cfg.val or []), list(cfg.test or [])
        train = list(cfg.train) if cfg.train is not None else [c for c in training if c not in set(val) | set(test)]
        source = "data.split"
    elif cfg.splits_file is not None:
        path = Path(cfg.splits_file)
        path = path if path.is_absolute() else info.root / path
        folds = _read_json(path)
        if not isinstance(folds, list) or not all(isinstance(f, dict) and "train" in f and "val" in f for f in folds):
            raise DatasetError(path, 'a list of folds [{"train": [...], "val": [...]}, ...]', type(folds).__name__,
                               "use nnU-Net's splits_final.json format")
        if not 0 <= cfg.fold < len(folds):
            raise DatasetError(path, f"fold in 0..{len(folds) - 1}", f"fold {cfg.fold}", "set data.split.fold")
        train, val = list(folds[cfg.fold]["train"]), list(folds[cfg.fold]["val"])
        test = [c for c in training if c not in set(train) | set(val)]
        source = str(path)
    elif (info.root / "splits.json").is_file():
        path = info.root / "splits.json"
        split = _read_json(path)
        if not isinstance(split, dict) or not {"train", "val"} <= set(split):
            raise DatasetError(path, 'an object {"train": [...], "val": [...], "test": [...]}', repr(split)[:80],
                               "repair splits.json or delete it to fall back to seeded fractions")
        train, val, test = list(split["train"]), list(split["val"]), list(split.get("test", []))
        source = str(path)
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(training))
        n_val = min(len(training) - 1, max(1, int(round(cfg.val_fraction * len(training)))))
        val = sorted(training[i] for i in order[:n_val])
        train = sorted(training[i] for i in order[n_val:])
        test = []
        source = "seeded fractions"
    known = set(training)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        unknown = [c for c in ids if c not in known]
        if unknown:
            raise DatasetError(source, f"{name} case ids that have image and label in {info.root}",
                               f"unknown ids {unknown[:5]}", f"use ids such as {training[:3]} or fix the split")
    if not train:
        raise DatasetError(source, "at least one training case", "none", "name training cases in the split")
    if cfg.train_fraction < 1.0:
        n_keep = max(1, int(round(cfg.train_fraction * len(train))))
        keep = set(np.random.default_rng(cfg.seed).permutation(len(train))[:n_keep].tolist())
        train = [c for i, c in enumerate(train) if i in keep]
    return Splits(train=train, val=val, test=test)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(path, "a JSON split file", "no such file", "fix data.split.splits_file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(path, "valid JSON", f"a parse error ({err})", "repair the file") from None


def dataset_fingerprint(info: DatasetInfo) -> str:
    """sha256 over dataset.json's bytes and the sorted (relative path, size) of every file in the case folders."""
    digest = hashlib.sha256((info.root / "dataset.json").read_bytes())
    entries = []
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        folder = info.root / sub
        if folder.is_dir():
            entries += [(f"{sub}/{p.name}", p.stat().st_size) for p in folder.iterdir() if p.is_file()]
    for name, size in sorted(entries):
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()
