"""Medical Segmentation Decathlon / nnU-Net raw dataset layout: dataset.json, the case lists, the dataset fingerprint.

Layout under a dataset root:
    dataset.json            labels (nnU-Net v2 `{"background": 0, ...}` or MSD `{"0": "background", ...}`),
                            `channel_names` (v2) or `modality` (MSD), `file_ending` (default ".nii.gz")
    imagesTr/ labelsTr/     training images and labels
    imagesTs/ labelsTs/     test images (optional) and their labels (optional; a labelled imagesTs is the test split)
    splits_final.json       optional nnU-Net folds `[{"train": [...], "val": [...]}, ...]`, used by default
    splits.json             optional `{"train": [...], "val": [...], "test": [...]}` (the bundled benchmark writes it)
A case's channels are either separate files `<case>_0000<ending>`, `<case>_0001<ending>`, ... (nnU-Net v2) or one
file `<case><ending>` whose last axis holds the channels when it has one more axis than the spatial dims (MSD 4D).

Spatial dims (2 or 3) come from dataset.json: `"dims"`, else `tensorImageSize` ("2D" -> 2, "3D"/"4D" -> 3), else the
first training image: a file of 2 axes, or of 3 axes whose last has size 1, is 2D; anything else is 3D. A 2D case may
be stored with 2 axes or with a singleton third axis; the singleton axis is dropped in memory.

In memory an image is `(C, *S)` float32 channel-first with S in NIfTI voxel order, a label `(*S)` uint8.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from augsearch.data.nifti import NIFTI_SUFFIXES, load_nifti, missing_channel_files, scan_images
from augsearch.errors import DatasetError
from augsearch.textfiles import MalformedText, read_json


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
    test_labelled: list[str] = field(default_factory=list)  # imagesTs case ids with a label in labelsTs

    def image_files(self, case_id: str, split: str = "Tr") -> list[Path]:
        """Channel files of one case: `[<case><ending>]` (MSD) or `[<case>_0000<ending>, ...]` (nnU-Net v2)."""
        folder = self.root / f"images{split}"
        single = folder / f"{case_id}{self.file_ending}"
        if single.exists():
            return [single]
        return [folder / f"{case_id}_{c:04d}{self.file_ending}" for c in range(len(self.channel_names))]

    def label_file(self, case_id: str, split: str = "Tr") -> Path:
        return self.root / f"labels{split}" / f"{case_id}{self.file_ending}"

    def has_label(self, case_id: str, split: str = "Tr") -> bool:
        return split == "Tr" or case_id in self.test_labelled


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # (C, *S) float32, preprocessed (resampled + normalised)
    label: np.ndarray | None  # (*S) uint8 on the preprocessed grid
    spacing: tuple[float, ...]  # preprocessed spacing (mm), len == dims
    original_spacing: tuple[float, ...]
    original_shape: tuple[int, ...]  # spatial shape on disk
    affine: np.ndarray  # 4x4 affine of the file on disk


# dataset.json and folder scanning


def read_dataset_json(root: str | Path) -> dict[str, Any]:
    """Parse `root/dataset.json`; DatasetError when the folder or the file is missing or not JSON."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "a dataset folder", "no such folder",
                           "point data.root at a folder holding dataset.json, or set data.generate = true with a "
                           "[data.synth] section to write the bundled benchmark there")
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(path, "a dataset.json file", "no such file",
                           "add dataset.json (nnU-Net v2 or MSD format) or generate one with `augsearch data synth`")
    try:
        meta = read_json(path)
    except MalformedText as err:
        raise DatasetError(path, "valid JSON", str(err), "repair the file") from None
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
    if values != list(range(len(values))):
        # The segmenter has one output per value 0..K-1, as in nnU-Net, which requires the same.
        renumber = ", ".join(f"{v} -> {i}" for i, v in enumerate(values) if v != i)
        raise DatasetError(path, f"consecutive label values 0..{len(values) - 1}", repr(labels),
                           f"renumber the classes in dataset.json and in every label file ({renumber})")
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def parse_file_ending(meta: dict[str, Any], path: Path) -> str:
    """`file_ending`, one of the NIfTI endings this package reads (default ".nii.gz")."""
    file_ending = str(meta.get("file_ending", ".nii.gz"))
    if file_ending not in NIFTI_SUFFIXES:
        raise DatasetError(path, f"file_ending {' or '.join(NIFTI_SUFFIXES)} (augsearch reads NIfTI files)",
                           repr(file_ending), "convert the images and labels to NIfTI (for example with SimpleITK "
                           "or nibabel, keeping each file's spacing) and set \"file_ending\": \".nii.gz\"")
    return file_ending


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


def infer_dims(meta: dict[str, Any], first_image: Path | None, path: Path | None = None) -> int:
    if "dims" in meta:
        dims = meta["dims"]
        if type(dims) is not int or dims not in (2, 3):
            raise DatasetError(path or "dataset.json", '"dims" 2 or 3 (a number)', repr(dims),
                               'write "dims": 2 or "dims": 3, or leave it out to infer it from the images')
        return dims
    size = str(meta.get("tensorImageSize", "")).upper()
    if size == "2D":
        return 2
    if size in ("3D", "4D"):
        return 3
    if first_image is None:
        return 3
    shape = load_nifti(first_image).shape
    return 2 if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else 3


def read_dataset_info(root: str | Path) -> DatasetInfo:
    """Read dataset.json and list the cases; DatasetError on a missing folder, image without label or channel."""
    root = Path(root)
    meta = read_dataset_json(root)
    path = root / "dataset.json"
    labels = parse_labels(meta, path)
    channels = parse_channel_names(meta, path)
    file_ending = parse_file_ending(meta, path)
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
    labelled = sorted(c for c in test if (root / "labelsTs" / f"{c}{file_ending}").is_file())
    return DatasetInfo(root=root, name=str(meta.get("name", root.name)), labels=labels, channel_names=channels,
                       file_ending=file_ending, dims=infer_dims(meta, first, path), training=sorted(images),
                       test=sorted(test), test_labelled=labelled)


def read_json_file(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(path, "a JSON split file", "no such file", "fix data.split.splits_file")
    try:
        return read_json(path)
    except MalformedText as err:
        raise DatasetError(path, "valid JSON", str(err), "repair the file") from None


def dataset_fingerprint(info: DatasetInfo) -> str:
    """sha256 over dataset.json's bytes and the sorted (relative path, size) of every file in the case folders."""
    digest = hashlib.sha256((info.root / "dataset.json").read_bytes())
    entries = []
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        folder = info.root / sub
        if folder.is_dir():
            entries += [(f"{sub}/{p.name}", p.stat().st_size) for p in folder.iterdir() if p.is_file()]
    for name, size in sorted(entries):
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()
