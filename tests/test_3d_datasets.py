"""A new user's 3D dataset: small batches learn, nnU-Net layouts (splits_final.json, imagesTs/labelsTs, CT) are
honoured, non-cubic patches run, predictions and policy files are ready for the next tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from augsearch.config import load_config
from augsearch.policy.io import load_policy
from augsearch.policy.presets import policy_from_file_or_preset
from augsearch.train import fit

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"
LABELS = {"background": 0, "organ": 1, "lesion": 2}


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "smoke2d"


def _smoke(root, **overrides):
    base = {"data.root": str(root), "train.epochs": 1, "train.iterations": 4, "train.batch_size": 2,
            "train.val_batch_size": 2, "augment.tea.learn": False}
    base.update(overrides)
    return load_config(SMOKE, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def test_class_specific_search_learns_at_batch_size_two(smoke_root, tmp_path):
    result = fit(_smoke(smoke_root), tmp_path / "run", progress=False)
    start = policy_from_file_or_preset("uniform-0.1", dims=2, label_names=LABELS, patch_size=[32, 32])
    learned = load_policy(result.policy_path)
    for group in range(len(learned.group_names)):
        assert not torch.equal(learned.tra_logits[group], start.tra_logits[group]), learned.group_names[group]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["meta/steps"] == 4 and "meta/empty_group_updates" in lines[-1]
