"""Dataset integrity check (like nnU-Net's): every problem found, not only the first.

Checks: dataset.json readable and complete; imagesTr/labelsTr present; every training image has its label and all
channel files, every label its image; headers and voxel data readable; image and label agree in shape, spacing and
affine; channel files of a case agree with each other; label values are in dataset.json; no NaN/inf voxels;
imagesTs cases have all channels and are readable, and with a labelsTs folder get the same checks as imagesTr/labelsTr;
splits.json and splits_final.json (when present) name known cases. The report says which split training uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from augsearch.config import SplitConfig
from augsearch.data.dataset import (
    infer_dims,
    parse_channel_names,
    parse_file_ending,
    parse_labels,
    read_dataset_info,
    read_dataset_json,
)
from augsearch.data.nifti import (
    check_pair,
    missing_channel_files,
    read_image,
    read_label,
    scan_images,
)
from augsearch.data.splits import resolve_splits
from augsearch.errors import DatasetError
from augsearch.textfiles import MalformedText, read_json


@dataclass(frozen=True)
class Problem:
    file: str
    expected: str
    found: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.file}: expected {self.expected}, found {self.found}" + (f". Fix: {self.fix}" if self.fix else "")


def _problem(err: DatasetError) -> Problem:
    return Problem(err.file, err.expected, err.found, err.fix)


def check_dataset(root: str | Path) -> list[Problem]:
    """Every integrity problem of the dataset at `root`; an empty list means it is sound."""
    root = Path(root)
    try:
        meta = read_dataset_json(root)
    except DatasetError as err:
        return [_problem(err)]
    problems: list[Problem] = []
    path = root / "dataset.json"
    labels = channels = None
    try:
        labels = parse_labels(meta, path)
    except DatasetError as err:
        problems.append(_problem(err))
    try:
        channels = parse_channel_names(meta, path)
    except DatasetError as err:
        problems.append(_problem(err))
    file_ending = ".nii.gz"
    try:
        file_ending = parse_file_ending(meta, path)
    except DatasetError as err:
        problems.append(_problem(err))
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).is_dir():
            problems.append(Problem(str(root / sub), "a folder of training files", "no such folder",
                                    f"create {sub}/"))
    if labels is None or channels is None or problems:
        return problems

    images = scan_images(root / "imagesTr", file_ending)
    label_files = _label_files(root / "labelsTr", file_ending)
    if not images:
        problems.append(Problem(str(root / "imagesTr"), f"training images ending in {file_ending}", "none",
                                "add images or fix `file_ending` in dataset.json"))
        return problems
    if isinstance(meta.get("numTraining"), int) and meta["numTraining"] != len(images):
        problems.append(Problem(str(path), f"numTraining = number of training cases ({len(images)})",
                                str(meta["numTraining"]), "correct numTraining"))
    try:
        dims = infer_dims(meta, next(iter(images.values()))[0], path)
    except DatasetError as err:
        problems.append(_problem(err))
        dims = 3
    problems += _orphan_labels(label_files, images, "training", file_ending)
    foreground: list[bool] = []
    for case_id, files in images.items():
        problems += _check_case(root, "Tr", case_id, files, channels, file_ending, dims, labels,
                                label_files.get(case_id), foreground=foreground)
    if len(foreground) == len(images) and not any(foreground):
        problems.append(Problem(str(root / "labelsTr"), "foreground voxels (a label value other than 0) in the "
                                "training labels", f"only background in all {len(images)} label maps",
                                "check the label files: empty masks, or labels exported without their values"))
    test_images = scan_images(root / "imagesTs", file_ending) if (root / "imagesTs").is_dir() else {}
    test_labels = _label_files(root / "labelsTs", file_ending) if (root / "labelsTs").is_dir() else None
    if test_labels is not None:
        problems += _orphan_labels(test_labels, test_images, "test", file_ending)
    for case_id, files in test_images.items():
        problems += _check_case(root, "Ts", case_id, files, channels, file_ending, dims, labels,
                                None if test_labels is None else test_labels.get(case_id),
                                labelled=test_labels is not None)
    problems += _check_splits(root, set(images))
    if not problems:
        try:
            resolve_splits(read_dataset_info(root), SplitConfig())
        except DatasetError as err:
            problems.append(_problem(err))
    return list(dict.fromkeys(problems))  # the first image is read twice (its dims, its case): one problem


def _label_files(folder: Path, file_ending: str) -> dict[str, Path]:
    return {p.name[: -len(file_ending)]: p for p in folder.iterdir()
            if p.is_file() and p.name.endswith(file_ending) and not p.name.startswith(".")}


def _orphan_labels(label_files: dict[str, Path], images: dict[str, list[Path]], kind: str,
                   file_ending: str) -> list[Problem]:
    return [Problem(str(label_files[case_id]), f"a {kind} image {case_id}_0000{file_ending} or {case_id}{file_ending}",
                    "none", "add the image or remove the label")
            for case_id in sorted(set(label_files) - set(images))]


def _check_case(root: Path, split: str, case_id: str, files: list[Path], channels: list[str], file_ending: str,
                dims: int, labels: dict[str, int], label_path: Path | None, labelled: bool = True,
                foreground: list[bool] | None = None) -> list[Problem]:
    """The case's problems; appends to FOREGROUND (when given) whether its readable label has a foreground voxel."""
    missing = missing_channel_files(root, split, case_id, files, len(channels), file_ending)
    problems = [Problem(str(p), f"channel file {p.name} of case {case_id} ({len(channels)} channels)", "no such file",
                        "add the missing channel file") for p in missing]
    if labelled and label_path is None:
        kind, fix = ("training", "move the image to imagesTs/") if split == "Tr" else ("test", "remove the image")
        problems.append(Problem(str(root / f"labels{split}" / f"{case_id}{file_ending}"),
                                f"the label of {kind} image {files[0].name}", "no such file",
                                f"add the label or {fix}"))
    image = None
    if not missing:
        try:
            image, spacing, affine, _ = read_image(files, dims)
            if image.shape[0] != len(channels):
                problems.append(Problem(str(files[0]), f"{len(channels)} channel(s) as in dataset.json",
                                        f"{image.shape[0]}", "fix channel_names or the file"))
        except DatasetError as err:
            problems.append(_problem(err))
    if label_path is not None:
        try:
            label, label_spacing, label_affine = read_label(label_path, dims, labels)
            if foreground is not None:
                foreground.append(bool(label.any()))
            if image is not None:
                problems += [_problem(e) for e in check_pair(files[0], label_path, image.shape[1:], spacing, affine,
                                                             label.shape, label_spacing, label_affine)]
        except DatasetError as err:
            problems.append(_problem(err))
    return problems


def _check_splits(root: Path, known: set[str]) -> list[Problem]:
    path = root / "splits.json"
    if not path.is_file():
        return []
    try:
        split = read_json(path)
    except MalformedText as err:
        return [Problem(str(path), "valid JSON", str(err), "repair or delete splits.json")]
    if not isinstance(split, dict):
        return [Problem(str(path), 'an object {"train": [...], "val": [...], "test": [...]}', type(split).__name__,
                        "repair or delete splits.json")]
    problems = []
    for name in ("train", "val", "test"):
        unknown = [c for c in split.get(name, []) if c not in known]
        if unknown:
            problems.append(Problem(str(path), f"{name} ids of training cases", f"unknown ids {unknown[:5]}",
                                    "fix splits.json"))
    return problems


GROUP_FROM = 4  # this many problems with one expectation and fix are one line naming a few of their files


def _group_lines(problems: list[Problem]) -> list[str]:
    """One line per problem; problems that share `expected` and `fix` (one cause, many files) share one line."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        groups.setdefault((problem.expected, problem.fix), []).append(problem)
    lines = []
    for (expected, fix), group in groups.items():
        if len(group) < GROUP_FROM:
            lines += [str(p) for p in group]
            continue
        files = ", ".join(p.file for p in group[:3])
        found = sorted({p.found for p in group})
        found_text = ", ".join(found[:5]) + (f" ... ({len(found)} distinct)" if len(found) > 5 else "")
        lines.append(f"{len(group)} files ({files}, ...): expected {expected}, found {found_text}"
                     + (f". Fix: {fix}" if fix else ""))
    return lines


def format_report(root: str | Path, problems: list[Problem]) -> str:
    """Human-readable report: one line per problem (or per group of problems with one cause), or an OK summary."""
    if problems:
        return f"{root}: {len(problems)} problem(s)\n" + "\n".join(f"  - {line}" for line in _group_lines(problems))
    root = Path(root)
    meta = read_dataset_json(root)
    file_ending = parse_file_ending(meta, root / "dataset.json")
    n_train = len(scan_images(root / "imagesTr", file_ending))
    n_test = len(scan_images(root / "imagesTs", file_ending)) if (root / "imagesTs").is_dir() else 0
    labels = parse_labels(meta, root / "dataset.json")
    n_labelled = len(_label_files(root / "labelsTs", file_ending)) if (root / "labelsTs").is_dir() else 0
    splits = resolve_splits(read_dataset_info(root), SplitConfig())
    return (f"{root}: OK ({n_train} training cases, {n_test} test cases ({n_labelled} labelled), labels {labels})\n"
            f"split used by training (data.split defaults, fold 0): {splits.describe()}")
