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


@pytest.mark.parametrize("patch", [[16, 16, 24], [32, 40, 32]])
def test_joint_search_step_runs_on_a_non_cubic_patch(patch, tmp_path, capsys):
    from augsearch.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "meta", "--quick", "--dims", "3", "--patch", *map(str, patch), "--device", "cpu",
                 "--repeats", "1", "--backends", "jvp", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["patch_size"] == patch and result["jvp"]["joint_ms"] > 0


def test_every_construction_path_masks_turns_the_patch_cannot_make(tmp_path):
    from augsearch.ops.geometry import is_turn
    from augsearch.policy.init import make_policy
    from augsearch.policy.io import save_policy

    patch = [32, 40, 32]  # x == z: the xz plane is square, the xy and yz planes are not
    cubic = make_policy(3, LABELS)
    save_policy(cubic, tmp_path / "cubic.json")
    built = {
        "make_policy": make_policy(3, LABELS, patch_size=patch),
        "preset": policy_from_file_or_preset("nnunet", 3, LABELS, patch_size=patch),
        "file": policy_from_file_or_preset(tmp_path / "cubic.json", 3, LABELS, patch_size=patch),
        "with_patch_size": cubic.with_patch_size(patch),
    }
    turns = {e.name: e.id for e in cubic.tea_entries if is_turn(e)}
    assert len(turns) == 9 and bool(cubic.tea_available[list(turns.values())].all())
    for how, policy in built.items():
        blocked = {name for name, i in turns.items() if not bool(policy.tea_available[i])}
        assert blocked == {n for n in turns if "_xz" not in n}, how
        for op, square in (("rotate_xy", False), ("rotate_yz", False), ("rotate_xz", True)):
            k = policy.op_names.index(op)
            rot90 = [b for b, spec in enumerate(policy.op_bins[k]) if "rot90" in spec.label]
            assert bool(policy.available[k, rot90].all()) == square, (how, op)
        assert not any(policy.tea_entries[i].name in blocked for i, _ in policy.tea_selected(8)), how
        ids = policy.sample_tea(500, torch.Generator().manual_seed(0))
        assert not any(policy.tea_entries[int(i)].name in blocked for i in ids), how
