"""Arrange MSD Task04 Hippocampus into the run's data folder, in the nnU-Net v2 raw layout augsearch reads.

    python experiments/hippocampus/prepare.py                                  # from ../shared/data/msd_hippocampus_200
    python experiments/hippocampus/prepare.py --source ~/Downloads/Task04_Hippocampus.tar
    python experiments/hippocampus/prepare.py --source ~/data/Task04_Hippocampus  # an unpacked download

The source is the shared copy (nnU-Net v2 raw: `imagesTr/<case>_0000.nii.gz`) or the Medical Segmentation Decathlon
download (MSD: `imagesTr/<case>.nii.gz`, `dataset.json` with "modality" and "labels" as "int" -> name), as a folder
or as the tar itself (unpacked into <out>/../Task04_Hippocampus_unpacked/, `._` resource forks skipped). Only the
200 cases named by the committed splits are used; the other 60 labelled cases of the download stay out. The data
folder holds a `dataset.json`, symbolic links to the source volumes (nothing is copied), and the committed
`splits_final.json` and `test_cases.json`; every case's label voxels are compared with the committed checksums, so a
download and the shared copy give the same experiment. The folder is then checked with `augsearch data check`.

`--write-splits` (re)writes the committed split files from the case ids (seeded); it refuses to change existing ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from augsearch.atomic import write_json
from augsearch.data.dataset import read_dataset_info
from augsearch.data.nifti import read_label
from augsearch.errors import AugsearchError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SPLITS, TEST_CASES, CHECKSUMS = HERE / "splits_final.json", HERE / "test_cases.json", HERE / "label_sha256.json"
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
SPLIT_SEED, N_VAL, TRAIN_SIZES = 13, 20, (10, 40)
DATASET_JSON = {
    "name": "Hippocampus",
    "description": "Medical Segmentation Decathlon Task04 Hippocampus (Vanderbilt), the 200 cases of "
                   "experiments/hippocampus/splits_final.json and test_cases.json",
    "reference": "Simpson et al. 2019, arXiv:1902.09063; Antonelli et al. 2022, Nat Commun 13:4128",
    "licence": "CC-BY-SA 4.0",
    "channel_names": {"0": "MRI"},
    "labels": LABELS,
    "numTraining": 200,
    "file_ending": ".nii.gz",
}


def shared_copy(repo: Path = REPO) -> Path:
    """../shared/data/msd_hippocampus_200 beside the repository, or beside its main checkout when `repo` is a linked
    git worktree (whose .git file names <main>/.git/worktrees/<name>); the first candidate when none exists."""
    roots = [repo]
    if (repo / ".git").is_file():
        roots.append(Path((repo / ".git").read_text().split(":", 1)[1].strip()).parents[2])
    candidates = [root.parent / "shared" / "data" / "msd_hippocampus_200" for root in roots]
    return next((c for c in candidates if (c / "dataset.json").is_file()), candidates[0])


class PrepareError(AugsearchError):
    """A source that is not a Task04 Hippocampus dataset, or a data folder that would be overwritten."""


def make_splits(case_ids: list[str], seed: int = SPLIT_SEED) -> tuple[list[dict[str, list[str]]], list[str]]:
    """Seeded nested splits: fold k trains on the first TRAIN_SIZES[k] of one shuffled order, all folds share the
    same N_VAL validation cases, and the test cases are the rest (never used for a decision)."""
    order = [case_ids[i] for i in np.random.default_rng(seed).permutation(len(case_ids))]
    val, rest = sorted(order[:N_VAL]), order[N_VAL:]
    folds = [{"train": sorted(rest[:size]), "val": val} for size in TRAIN_SIZES]
    return folds, sorted(rest[max(TRAIN_SIZES):])


def split_case_ids() -> list[str]:
    """The 200 case ids of the committed splits."""
    folds = json.loads(SPLITS.read_text())
    return sorted(set(folds[-1]["train"]) | set(folds[-1]["val"]) | set(json.loads(TEST_CASES.read_text())))


def label_digest(label: np.ndarray) -> str:
    """sha256 of a label volume's shape and uint8 voxels in NIfTI voxel order (independent of file compression)."""
    voxels = np.ascontiguousarray(label, dtype=np.uint8).tobytes()
    return hashlib.sha256(repr(label.shape).encode() + voxels).hexdigest()


def unpack(tar_path: Path, into: Path) -> Path:
    """Unpack the Task04 tar into `into` (once); the folder that holds its dataset.json."""
    if not any(into.glob("**/dataset.json")):
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path) as archive:
            members = [m for m in archive.getmembers() if not Path(m.name).name.startswith("._")]
            archive.extractall(into, members=members, filter="data")
    found = sorted(into.glob("**/dataset.json"))
    if not found:
        raise PrepareError(f"{tar_path}: expected the Task04_Hippocampus tar (with dataset.json), found none in it; "
                           "download Task04_Hippocampus.tar from the Medical Segmentation Decathlon")
    return found[0].parent


def source_images(source: Path, cases: list[str]) -> dict[str, tuple[Path, Path]]:
    """case -> (image file, label file) in an MSD or nnU-Net v2 raw folder; PrepareError naming missing cases."""
    info = read_dataset_info(source)
    if dict(info.labels) != LABELS or len(info.channel_names) != 1:
        raise PrepareError(f"{source}/dataset.json: expected labels {LABELS} and one channel, found "
                           f"{dict(info.labels)} and channels {info.channel_names}; is this Task04 Hippocampus?")
    missing = [c for c in cases if c not in set(info.training)]
    if missing:
        raise PrepareError(f"{source}: expected the 200 cases of {SPLITS.name}, {len(missing)} missing "
                           f"(e.g. {missing[:3]}); use the full Task04 download or the shared copy")
    return {c: (info.image_files(c)[0], info.label_file(c)) for c in cases}


def link(target: Path, link_path: Path) -> None:
    """A symbolic link to `target`; an existing link must already point there (no silent overwrite)."""
    if link_path.is_symlink() or link_path.exists():
        if link_path.resolve() != target.resolve():
            raise PrepareError(f"{link_path}: expected a link to {target.resolve()}, found "
                               f"{link_path.resolve()}; remove the data folder or pass another --out")
        return
    link_path.symlink_to(target.resolve())


def verify_labels(pairs: dict[str, tuple[Path, Path]]) -> None:
    """Every label's voxels against the committed checksums; PrepareError naming the cases that differ."""
    expected = json.loads(CHECKSUMS.read_text())
    wrong = [c for c, (_, label) in pairs.items()
             if label_digest(read_label(label, 3, LABELS)[0]) != expected.get(c)]
    if wrong:
        raise PrepareError(f"labels of {len(wrong)} case(s) differ from {CHECKSUMS.name} (e.g. {wrong[:3]}): this "
                           "source is not the Task04 release the splits were made for; pass --no-verify to use it "
                           "anyway, and say so beside any result")


def prepare(source: Path, out: Path, verify: bool = True) -> Path:
    """Arrange `source` (folder or tar) into `out`; return `out` after `augsearch data check` passed."""
    if source.is_file() and tarfile.is_tarfile(source):
        source = unpack(source, out.parent / f"{source.name.split('.')[0]}_unpacked")
    cases = split_case_ids()
    pairs = source_images(source, cases)
    if verify:
        verify_labels(pairs)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for case, (image, label) in pairs.items():
        link(image, out / "imagesTr" / f"{case}_0000.nii.gz")
        link(label, out / "labelsTr" / f"{case}.nii.gz")
    for path, content in ((out / "dataset.json", {**DATASET_JSON, "numTraining": len(cases)}),
                          (out / SPLITS.name, json.loads(SPLITS.read_text())),
                          (out / TEST_CASES.name, json.loads(TEST_CASES.read_text()))):
        if path.is_file() and json.loads(path.read_text()) != content:
            raise PrepareError(f"{path}: exists with other content; remove it to rewrite it from the committed files")
        write_json(path, content)
    done = subprocess.run([sys.executable, "-m", "augsearch", "data", "check", str(out)], check=False)
    if done.returncode != 0:
        raise PrepareError(f"`augsearch data check {out}` found problems (listed above)")
    return out


def write_splits(source: Path) -> None:
    """Write splits_final.json, test_cases.json and label_sha256.json from `source`'s 200 cases (first time only)."""
    info = read_dataset_info(source)
    if len(info.training) != 200:
        raise PrepareError(f"{source}: expected the 200-case shared copy to draw the splits from, found "
                           f"{len(info.training)} cases")
    folds, test = make_splits(list(info.training))
    digests = {c: label_digest(read_label(info.label_file(c), 3, LABELS)[0]) for c in info.training}
    for path, content in ((SPLITS, folds), (TEST_CASES, test), (CHECKSUMS, digests)):
        if path.is_file() and json.loads(path.read_text()) != content:
            raise PrepareError(f"{path} exists and differs: the committed splits are fixed; delete it only to start "
                               "a new protocol")
        write_json(path, content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=shared_copy(),
                        help=f"Task04 folder or tar, or the shared copy (default {shared_copy()})")
    parser.add_argument("--out", type=Path, default=Path("runs/data/hippocampus"),
                        help="data folder to arrange (default runs/data/hippocampus; never inside the repository's "
                             "tracked files)")
    parser.add_argument("--no-verify", action="store_true", help="skip the label checksums")
    parser.add_argument("--write-splits", action="store_true", help="write the committed split files from --source")
    args = parser.parse_args(argv)
    try:
        if args.write_splits:
            write_splits(args.source)
        out = prepare(args.source, args.out, verify=not args.no_verify)
    except AugsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{out}: 200 cases, splits_final.json (fold 0: 10 training cases, fold 1: 40) and test_cases.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
