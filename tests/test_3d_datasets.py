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


def test_single_sample_group_is_centred_on_its_running_baseline():
    from augsearch.learn.meta import centre_and_normalise

    c, groups, bins = torch.tensor([0.3, -0.2]), torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.long)
    # The batch mean of a one-sample group is the sample itself: nothing is left to learn from.
    assert torch.equal(centre_and_normalise(c, groups, bins), torch.zeros(2, 1))
    centred = centre_and_normalise(c, groups, bins, running_baseline=torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(centred, torch.tensor([[0.2], [-0.2]]))
    # Groups with two or more samples keep their batch mean.
    two = centre_and_normalise(torch.tensor([0.3, 0.1, 5.0]), torch.tensor([0, 0, 1]), torch.zeros(3, 1).long(),
                               running_baseline=torch.tensor([9.0, 4.0]), count_normalization=False)
    torch.testing.assert_close(two, torch.tensor([[0.1], [-0.1], [1.0]]))


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


# an nnU-Net raw dataset: CT, imagesTs/labelsTs, splits_final.json


def _nifti(path, array, spacing=(0.9, 0.9, 2.5)):
    import nibabel
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), str(path))


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory):
    """6 training cases (splits_final.json: 2 folds), 2 labelled test cases; one CT channel in HU."""
    import numpy as np

    root = tmp_path_factory.mktemp("nnunet") / "Dataset001_Tiny"
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 6, "file_ending": ".nii.gz"}))
    for split, cases in (("Tr", [f"tr_{i}" for i in range(6)]), ("Ts", ["ts_0", "ts_1"])):
        for case in cases:
            label = np.zeros((20, 18, 12), np.uint8)
            label[5:14, 4:13, 3:9] = 1
            label[8:11, 7:10, 5:7] = 2
            image = rng.normal(-800, 50, label.shape) + 850 * (label > 0) + 60 * (label == 2)
            _nifti(root / f"images{split}" / f"{case}_0000.nii.gz", image.astype(np.float32))
            _nifti(root / f"labels{split}" / f"{case}.nii.gz", label)
    folds = [{"train": ["tr_0", "tr_1", "tr_2", "tr_3"], "val": ["tr_4", "tr_5"]},
             {"train": ["tr_2", "tr_3", "tr_4", "tr_5"], "val": ["tr_0", "tr_1"]}]
    (root / "splits_final.json").write_text(json.dumps(folds))
    return root


def test_splits_final_and_labelled_test_folder_are_used_by_default(nnunet_root):
    from augsearch.config import PreprocessConfig, SplitConfig
    from augsearch.data.cases import load_cases
    from augsearch.data.dataset import read_dataset_info
    from augsearch.data.splits import resolve_splits

    info = read_dataset_info(nnunet_root)
    splits = resolve_splits(info, SplitConfig())
    assert (splits.train, splits.val) == (["tr_0", "tr_1", "tr_2", "tr_3"], ["tr_4", "tr_5"])
    assert (splits.test, splits.test_split) == (["ts_0", "ts_1"], "Ts")
    assert "splits_final.json fold 0" in splits.describe() and "imagesTs/labelsTs" in splits.describe()
    assert resolve_splits(info, SplitConfig(fold=1)).val == ["tr_0", "tr_1"]
    test = load_cases(info, splits.test, PreprocessConfig(), split="Ts")
    assert [c.case_id for c in test] == ["ts_0", "ts_1"] and all(c.label is not None and c.label.max() == 2
                                                                   for c in test)


def test_ct_channel_gets_ct_normalisation(nnunet_root):
    from augsearch.config import PreprocessConfig
    from augsearch.data.dataset import read_dataset_info
    from augsearch.data.preprocess import complete_preprocess, describe_normalisation

    cfg = complete_preprocess(read_dataset_info(nnunet_root), PreprocessConfig())
    assert cfg.normalization == "ct" and cfg.ct_clip[0] > -200 and 0 < cfg.ct_mean < 200
    assert describe_normalisation(cfg, ["CT"]).startswith("channel 0 (CT): CT: clip to")


def test_data_check_verifies_labels_ts_and_names_the_split(nnunet_root, tmp_path, capsys):
    import shutil

    import numpy as np

    from augsearch.cli import main

    assert main(["data", "check", str(nnunet_root)]) == 0
    out = capsys.readouterr().out
    assert "2 test cases (2 labelled)" in out and "splits_final.json fold 0" in out and "imagesTs/labelsTs" in out
    broken = tmp_path / "broken"
    shutil.copytree(nnunet_root, broken)
    _nifti(broken / "labelsTs" / "ts_1.nii.gz", np.full((20, 18, 12), 7, np.uint8))  # a value not in dataset.json
    _nifti(broken / "labelsTs" / "ts_9.nii.gz", np.zeros((20, 18, 12), np.uint8))  # a label without its image
    assert main(["data", "check", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "labelsTs/ts_1.nii.gz" in out and "labelsTs/ts_9.nii.gz" in out


def test_data_split_prints_the_ids_a_run_uses(nnunet_root, tmp_path, capsys):
    import shutil

    from augsearch.cli import main

    assert main(["data", "split", str(nnunet_root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "splits_final.json fold 0" in out[0]
    assert out[1:] == ["train (4, in imagesTr/): tr_0 tr_1 tr_2 tr_3", "val (2, in imagesTr/): tr_4 tr_5",
                       "test (2, in imagesTs/): ts_0 ts_1"]
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nroot = "{nnunet_root}"\n')
    assert main(["data", "split", str(config), "--set", "data.split.fold=1", "--part", "val"]) == 0
    assert capsys.readouterr().out.split() == ["tr_0", "tr_1"]
    # Without imagesTs the test cases are the labelled cases outside the fold, in imagesTr.
    no_ts = tmp_path / "no_ts"
    shutil.copytree(nnunet_root, no_ts, ignore=shutil.ignore_patterns("*Ts"))
    (no_ts / "splits_final.json").write_text(json.dumps([{"train": ["tr_0", "tr_1", "tr_2"], "val": ["tr_3"]}]))
    assert main(["data", "split", str(no_ts), "--part", "test"]) == 0
    assert capsys.readouterr().out.split() == ["tr_4", "tr_5"]
    (no_ts / "splits_final.json").unlink()
    assert main(["data", "split", str(no_ts), "--part", "test"]) == 2
    assert "has no test cases; name them in data.split.test" in capsys.readouterr().err
    assert main(["data", "split", str(no_ts), "--set", "data.split.fold=1"]) == 2
    assert "--set needs a config" in capsys.readouterr().err


@pytest.mark.slow
def test_tta_compare_runs_on_a_dataset_with_images_ts(nnunet_root, tmp_path, capsys):
    import os
    import subprocess

    cfg = load_config(SMOKE, [f"{k}={json.dumps(v)}" for k, v in {
        "data.root": str(nnunet_root), "data.cache_dir": str(tmp_path / "cache"), "train.epochs": 1,
        "train.iterations": 1, "train.batch_size": 2, "train.val_batch_size": 2, "train.patch_size": [16, 16, 8],
        "model.depth": 2, "model.base_features": 4, "augment.tea.learn": False, "augment.tea.top_k": 2}.items()])
    fit(cfg, tmp_path / "run", progress=True)
    log = capsys.readouterr().out
    assert "split: " in log and "splits_final.json fold 0" in log and "channel 0 (CT): CT: clip" in log
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(["bash", str(repo / "experiments" / "tta_compare.sh"), str(tmp_path / "run"),
                           str(tmp_path / "cmp"), "--device", "cpu"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "cmp" / "evaluation.csv").read_text().splitlines()
    assert {row.split(",")[1] for row in rows[1:]} == {"ts_0", "ts_1"}


def test_evaluate_reads_a_prediction_folder_written_with_uncertainty(nnunet_root, tmp_path, caplog):
    import shutil

    import numpy as np

    from augsearch.cli import main

    pred = tmp_path / "pred"
    shutil.copytree(nnunet_root / "labelsTs", pred)  # perfect segmentations
    _nifti(pred / "ts_0_entropy.nii.gz", np.zeros((20, 18, 12), np.float32))  # a map beside them
    assert main(["evaluate", "--pred", str(pred), "--gt", str(nnunet_root / "labelsTs"), "--out",
                 str(tmp_path / "eval.csv")]) == 0
    assert "ts_0_entropy.nii.gz" in caplog.text and "not segmentations" in caplog.text
    rows = (tmp_path / "eval.csv").read_text().splitlines()[1:]
    assert {row.split(",")[1] for row in rows} == {"ts_0", "ts_1"}
    assert all(float(row.split(",")[3]) == 1.0 for row in rows)
