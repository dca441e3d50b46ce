"""NIfTI files: reading images and labels channel-first, channel files (`_0000`) and 4D images, header and affine
rules, and the checks that an image and its label share one grid. Used by the dataset reader, `data check` and
predict.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from augsearch.errors import DatasetError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def nifti_suffix(path: Path) -> str | None:
    """The name's NIfTI suffix (".nii.gz" or ".nii"), or None when the name is not a NIfTI file."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return suffix
    return None


def nifti_stem(path: Path) -> str | None:
    """File name without its NIfTI suffix, or None when the name is not a NIfTI file."""
    suffix = nifti_suffix(path)
    return None if suffix is None else path.name[: -len(suffix)]


def scan_images(folder: Path, file_ending: str) -> dict[str, list[Path]]:
    """Case id -> files in an images folder: `_NNNN` channel suffixes grouped, other names one file per case."""
    cases: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not name.endswith(file_ending) or not path.is_file():
            continue
        stem = name[: -len(file_ending)]
        match = CHANNEL_SUFFIX.match(stem)
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


# NIfTI reading


def load_nifti(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise DatasetError(path, "a NIfTI file", "no such file", "add the file or remove the case")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for broken headers
        raise DatasetError(path, "a readable NIfTI file", f"{type(err).__name__}: {err}",
                           "re-export the volume; the file is corrupt or not NIfTI") from None


def _read_data(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray, Any]:
    img = load_nifti(path)
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
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DatasetError(path, "a positive, finite voxel spacing", f"spacing {spacing}",
                           "write the voxel size (pixdim) into the header and re-save")
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
        with np.errstate(over="ignore", invalid="ignore"):
            arr32 = arr.astype(np.float32, copy=False)  # what training sees: float64 beyond 3.4e38 becomes inf
        if not np.isfinite(arr32).all():
            bad = int((~np.isfinite(arr32)).sum())
            found = (f"{bad} voxel(s) beyond the float32 range (|value| > 3.4e38)" if np.isfinite(arr).all()
                     else f"{bad} NaN/inf voxels")
            raise DatasetError(path, "finite voxel values", found,
                               "replace the non-finite voxels (e.g. with the background value) or rescale the "
                               "volume, and re-save")
        channels.append(arr32)
    return np.concatenate(channels, axis=0), spacing, affine, header


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
