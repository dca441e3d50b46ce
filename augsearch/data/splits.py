"""Train / validation / test case lists: explicit lists, nnU-Net's `splits_final.json` with a fold (the config's file,
else the dataset's own), the benchmark's `splits.json`, or a seeded split by fractions; a labelled imagesTs/labelsTs
is the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from augsearch.config import SplitConfig
from augsearch.data.dataset import DatasetInfo, read_json_file
from augsearch.errors import DatasetError

NNUNET_SPLITS = "splits_final.json"


@dataclass
class Splits:
    """Case ids per role. The test cases are in images<test_split> ("Tr" or "Ts"); `source` says where the split
    came from (for logs and `data check`)."""

    train: list[str]
    val: list[str]
    test: list[str]
    test_split: str = "Tr"
    source: str = ""

    def describe(self) -> str:
        folder = "imagesTs/labelsTs" if self.test_split == "Ts" else "imagesTr"
        return (f"{self.source}: {len(self.train)} training, {len(self.val)} validation, {len(self.test)} test cases"
                f" (test from {folder})")


# splits and fingerprint


def resolve_splits(info: DatasetInfo, cfg: SplitConfig) -> Splits:
    """Train/val/test case ids per `SplitConfig` precedence, then a seeded `train_fraction` subset of train.

    Explicit lists: `train` defaults to every labelled case not named in val/test. nnU-Net `splits_final.json`
    (`splits_file`, relative paths under the dataset root; when unset, the dataset's own `splits_final.json`): fold
    `fold` gives train/val, test = labelled cases in neither. Benchmark `splits.json`: used as written. Else a seeded
    shuffle: `val_fraction` (at least 1 case) to val, the rest to train, test empty. Unless `test` is listed, a
    dataset with labelled test cases (imagesTs with labelsTs) tests on those. The subset keeps
    `max(1, round(train_fraction * n))` cases, in their original order.
    """
    training = list(info.training)
    if cfg.train is not None or cfg.val is not None or cfg.test is not None:
        val, test = list(cfg.val or []), list(cfg.test or [])
        train = list(cfg.train) if cfg.train is not None else [c for c in training if c not in set(val) | set(test)]
        source = "data.split lists"
    elif cfg.splits_file is not None or (info.root / NNUNET_SPLITS).is_file():
        path = Path(cfg.splits_file or NNUNET_SPLITS)
        path = path if path.is_absolute() else info.root / path
        folds = read_json_file(path)
        if not isinstance(folds, list) or not all(isinstance(f, dict) and "train" in f and "val" in f for f in folds):
            raise DatasetError(path, 'a list of folds [{"train": [...], "val": [...]}, ...]', type(folds).__name__,
                               "use nnU-Net's splits_final.json format")
        if not 0 <= cfg.fold < len(folds):
            raise DatasetError(path, f"fold in 0..{len(folds) - 1}", f"fold {cfg.fold}", "set data.split.fold")
        train, val = list(folds[cfg.fold]["train"]), list(folds[cfg.fold]["val"])
        test = [c for c in training if c not in set(train) | set(val)]
        source = f"{path} fold {cfg.fold}"
    elif (info.root / "splits.json").is_file():
        path = info.root / "splits.json"
        split = read_json_file(path)
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
        source = (f"seeded fallback (no {NNUNET_SPLITS} or splits.json in {info.root}; data.split.seed {cfg.seed}, "
                  f"val_fraction {cfg.val_fraction})")
    test_split = "Tr"
    if cfg.test is None and info.test_labelled:
        test, test_split = list(info.test_labelled), "Ts"
    known = set(training)
    for name, ids in (("train", train), ("val", val), ("test", test if test_split == "Tr" else [])):
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
    return Splits(train=train, val=val, test=test, test_split=test_split, source=source)
