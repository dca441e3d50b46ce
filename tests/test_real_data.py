"""Real MRI: three cases of MSD Task04 Hippocampus from ../shared/data/msd_hippocampus_200 (beside the repository).

The reader, the preprocessing, a few training steps of a tiny 3D U-Net, and TTA prediction that keeps each input's
header; plus experiments/hippocampus/prepare.py and its committed splits. Skipped only where the shared folder is
absent.
"""

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from augsearch.config import PreprocessConfig, config_from_dict
from augsearch.data.cases import load_case
from augsearch.data.dataset import read_dataset_info
from augsearch.data.nifti import read_image, read_label
from augsearch.predict.files import predict_files
from augsearch.train import fit

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "hippocampus"


def _load_prepare():
    spec = importlib.util.spec_from_file_location("hippocampus_prepare", EXPERIMENT / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prepare = _load_prepare()
SHARED = prepare.shared_copy()
pytestmark = pytest.mark.skipif(not (SHARED / "dataset.json").is_file(),
                                reason=f"real-data tests need the MSD Hippocampus copy at {SHARED} (absent here)")
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
FOLDS = json.loads((EXPERIMENT / "splits_final.json").read_text())
CASES = [*FOLDS[0]["train"][:2], FOLDS[0]["val"][0]]  # two to train on, one to validate and predict


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    """A dataset folder of three real cases, linked from the shared copy (nnU-Net v2 raw layout)."""
    root = tmp_path_factory.mktemp("hippocampus3")
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir()
    for case in CASES:
        (root / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(SHARED / "imagesTr" / f"{case}_0000.nii.gz")
        (root / "labelsTr" / f"{case}.nii.gz").symlink_to(SHARED / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(prepare.DATASET_JSON))
    return root


@pytest.fixture(scope="module")
def trained(three, tmp_path_factory):
    """A tiny 3D U-Net trained for 2 x 6 steps on two cases; (run folder, fit result)."""
    cfg = config_from_dict({
        "name": "real-tiny", "seed": 0,
        "data": {"root": str(three), "split": {"train": CASES[:2], "val": CASES[2:]}},
        "model": {"base_features": 4, "depth": 2},
        "train": {"epochs": 2, "iterations": 6, "batch_size": 2, "val_batch_size": 2, "patch_size": [16, 16, 16],
                  "optimizer": "adam", "lr": 1e-2, "device": "cpu", "num_threads": 1, "sliding_window_batch": 4},
        "loss": {"rare_labels": ["Anterior", "Posterior"]},
        "augment": {"mode": "none"},
    })
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, fit(cfg, run_dir, progress=False)


def test_reader_reads_real_cases(three):
    info = read_dataset_info(three)
    assert (info.dims, info.labels, info.channel_names, info.training) == (3, LABELS, ["MRI"], sorted(CASES))
    for case in CASES:
        image, spacing, affine, _ = read_image(info.image_files(case), dims=3)
        label, label_spacing, label_affine = read_label(info.label_file(case), 3, LABELS)
        assert image.shape[0] == 1 and image.shape[1:] == label.shape
        assert all(25 <= s <= 60 for s in label.shape), label.shape  # crops of about 35 x 50 x 35
        np.testing.assert_allclose(spacing, (1.0, 1.0, 1.0), atol=1e-3)
        np.testing.assert_allclose(affine, label_affine)
        assert tuple(label_spacing) == tuple(spacing)
        values, counts = np.unique(label, return_counts=True)
        assert values.tolist() == [0, 1, 2]
        assert 0.01 < counts[1] / label.size < 0.06 and 0.01 < counts[2] / label.size < 0.06  # 2-4% each


def test_preprocessing_normalises_without_resampling(three):
    info = read_dataset_info(three)
    case = load_case(info, CASES[0], PreprocessConfig(normalization="zscore"))
    raw, _, _, _ = read_image(info.image_files(CASES[0]), dims=3)
    raw_label, _, _ = read_label(info.label_file(CASES[0]), 3, LABELS)
    assert case.image.shape == raw.shape and case.original_shape == raw.shape[1:]
    assert abs(float(case.image.mean())) < 1e-3 and abs(float(case.image.std()) - 1.0) < 1e-3
    np.testing.assert_array_equal(case.label, raw_label)
    # z-score is affine in the intensities: the voxel order of brightness is kept
    np.testing.assert_allclose(np.corrcoef(case.image.ravel(), raw.ravel())[0, 1], 1.0, atol=1e-6)


def test_a_few_training_steps_learn(trained):
    run_dir, result = trained
    losses = [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert losses[1] < losses[0]  # CE + Dice from random weights falls within 12 Adam steps
    assert result.checkpoint_path.is_file()
    assert 0.0 <= result.metrics["val/dice_mean"] <= 1.0


def test_predict_with_tta_keeps_each_input_header(three, trained, tmp_path):
    _, result = trained
    out = tmp_path / "pred"
    predict_files(result.checkpoint_path, three / "imagesTr", out, policy="flips-tta", cases=CASES[2:],
                  device="cpu", progress=False)
    source = nib.load(str(three / "imagesTr" / f"{CASES[2]}_0000.nii.gz"))
    written = nib.load(str(out / f"{CASES[2]}.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    for form in ("sform", "qform"):
        matrix, code = getattr(written.header, f"get_{form}")(coded=True)
        source_matrix, source_code = getattr(source.header, f"get_{form}")(coded=True)
        assert code == source_code
        if source_matrix is not None:
            np.testing.assert_allclose(matrix, source_matrix, atol=1e-5)
    np.testing.assert_allclose(written.header.get_zooms(), source.header.get_zooms())
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}


def test_committed_splits_are_the_seeded_nested_splits():
    info = read_dataset_info(SHARED)
    folds, test = prepare.make_splits(list(info.training))
    assert folds == FOLDS and test == json.loads((EXPERIMENT / "test_cases.json").read_text())
    small, large = (set(f["train"]) for f in FOLDS)
    val, held_out = set(FOLDS[0]["val"]), set(test)
    assert (len(small), len(large), len(val), len(held_out)) == (10, 40, 20, 140)
    assert small < large and FOLDS[1]["val"] == FOLDS[0]["val"]
    assert not (large & val) and not (large & held_out) and not (val & held_out)


def test_prepare_links_checks_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "hippocampus"
    assert prepare.main(["--source", str(SHARED), "--out", str(out)]) == 0
    info = read_dataset_info(out)
    assert len(info.training) == 200 and info.labels == LABELS
    assert (out / "imagesTr" / f"{CASES[0]}_0000.nii.gz").is_symlink()
    assert json.loads((out / "splits_final.json").read_text()) == FOLDS
    again = ["--source", str(SHARED), "--out", str(out), "--no-verify"]  # the labels were verified above
    assert prepare.main(again) == 0  # a rerun finds everything in place
    (out / "dataset.json").write_text(json.dumps({**prepare.DATASET_JSON, "name": "other"}))
    assert prepare.main(again) == 1  # no silent overwrite


def test_prepare_reads_the_decathlon_tar_layout(tmp_path, monkeypatch):
    """The MSD download: one tar, imagesTr/<case>.nii.gz, MSD dataset.json, macOS `._` files beside the volumes."""
    import tarfile

    task = tmp_path / "src" / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    for case in CASES:
        (task / "imagesTr" / f"{case}.nii.gz").write_bytes((SHARED / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
        (task / "labelsTr" / f"{case}.nii.gz").write_bytes((SHARED / "labelsTr" / f"{case}.nii.gz").read_bytes())
        (task / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (task / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus", "tensorImageSize": "3D", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "numTraining": 3}))
    archive = tmp_path / "Task04_Hippocampus.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(task, arcname="Task04_Hippocampus")
    splits, test_cases = tmp_path / "splits_final.json", tmp_path / "test_cases.json"  # three of the 200 cases
    splits.write_text(json.dumps([{"train": CASES[:2], "val": CASES[2:]}]))
    test_cases.write_text("[]")
    monkeypatch.setattr(prepare, "SPLITS", splits)
    monkeypatch.setattr(prepare, "TEST_CASES", test_cases)
    out = prepare.prepare(archive, tmp_path / "data" / "hippocampus")
    info = read_dataset_info(out)
    assert info.training == sorted(CASES) and info.labels == LABELS
    unpacked = tmp_path / "data" / "Task04_Hippocampus_unpacked" / "Task04_Hippocampus"
    assert (out / "imagesTr" / f"{CASES[0]}_0000.nii.gz").resolve() == unpacked / "imagesTr" / f"{CASES[0]}.nii.gz"
    assert sorted(p.name for p in (unpacked / "imagesTr").iterdir()) == sorted(f"{c}.nii.gz" for c in CASES)


@pytest.mark.slow
def test_the_table_script_runs_a_fixed_and_the_joint_row_end_to_end(tmp_path):
    """experiments/protocol/run.py on experiments/hippocampus at a few steps: train, curve, post-hoc TEA, predict and
    score two test cases in each TTA column, per-run JSON and the tables; what a GPU lease or a week of CPU runs
    relies on."""
    import subprocess

    data = tmp_path / "hippocampus"
    assert prepare.main(["--source", str(SHARED), "--out", str(data), "--no-verify"]) == 0
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENT.parent / "protocol" / "run.py"), str(EXPERIMENT), "--rows", "none", "joint",
         "--seeds", "0", "--sizes", "10", "--jobs", "2", "--out", str(tmp_path / "runs"), "--results", str(results),
         "--data", str(data),
         "--set", "train.epochs=2", "--set", "train.iterations=3", "--set", "augment.warmup_iterations=2",
         "--test-limit", "2", "--curve-every", "1"],
        capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / "logs").glob("*.log"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    for row in ("none", "joint"):
        result = json.loads((results / "train10" / row / "seed0.json").read_text())
        assert result["segmenter_steps"] == 6 and result["test_cases"] == 2
        for column in ("none", "flips", "learned"):
            assert all(0 <= result["test"][column][name]["dice"] <= 1 for name in ("Anterior", "Posterior"))
        assert [line["epoch"] for line in result["curve"]] == [1, 2]
    joint = json.loads((results / "train10" / "joint" / "seed0.json").read_text())
    assert joint["meta_steps"] == 4 and joint["tea_steps"] == 4  # 6 steps, the first 2 under the initial policy
    table = (results / "results.md").read_text()
    assert "| 1 | none | 1 |" in table and "| 8 | joint class-specific TRA + TEA | 1 |" in table
