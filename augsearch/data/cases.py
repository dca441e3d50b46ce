"""Preprocessed cases, read once from NIfTI and then from an `.npy` cache keyed by the preprocessing settings and the
files' size and modification time (a second run reads no NIfTI).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from augsearch.atomic import atomic_open, write_json
from augsearch.config import PreprocessConfig
from augsearch.data.dataset import Case, DatasetInfo
from augsearch.data.nifti import check_pair, read_image, read_label
from augsearch.data.preprocess import (
    complete_preprocess,
    preprocess_image,
    resample_label,
)
from augsearch.errors import DatasetError

_CACHE_VERSION = 1


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
    if info.has_label(case_id, split):
        label_path = info.label_file(case_id, split)
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

    `split` is "Tr" (image + label) or "Ts" (image, and its label when labelsTs has it; else None). `cache_dir=None`
    disables caching. Missing CT statistics are measured first (`complete_preprocess`).
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
        files = info.image_files(case_id, split) + (
            [info.label_file(case_id, split)] if info.has_label(case_id, split) else [])
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
