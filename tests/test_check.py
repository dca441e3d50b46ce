"""Integrity check: one dataset with many planted faults, every one reported; the CLI's exit codes."""

from __future__ import annotations

import json

import nibabel
import numpy as np

from augsearch.cli import main
from augsearch.data.check import check_dataset


def _save(path, array, spacing=(1.0, 1.0, 2.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(np.asarray(array), np.diag(list(spacing) + [1.0])), str(path))


def _dataset(root, cases=("ok", "nolabel", "shape", "spacing", "value", "nan", "corrupt", "onechannel")):
    rng = np.random.default_rng(0)
    meta = {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "T1", "1": "T2"}, "numTraining": len(cases)}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for case in cases:
        for c in range(2):
            _save(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", rng.normal(size=(6, 5, 4)).astype(np.float32))
        _save(root / "labelsTr" / f"{case}.nii.gz", rng.integers(0, 2, (6, 5, 4)).astype(np.uint8))
    for c in range(2):
        _save(root / "imagesTs" / f"t_{c:04d}.nii.gz", np.zeros((6, 5, 4), np.float32))
    return root


def test_clean_dataset_passes(tmp_path, capsys):
    root = _dataset(tmp_path / "clean", cases=("a", "b"))
    assert check_dataset(root) == []
    assert main(["data", "check", str(root)]) == 0
    assert "OK (2 training cases, 1 test cases" in capsys.readouterr().out


def test_every_planted_fault_is_reported(tmp_path, capsys):
    root = _dataset(tmp_path / "bad")
    (root / "labelsTr" / "nolabel.nii.gz").unlink()
    _save(root / "labelsTr" / "shape.nii.gz", np.zeros((6, 5, 3), np.uint8))
    _save(root / "labelsTr" / "spacing.nii.gz", np.zeros((6, 5, 4), np.uint8), spacing=(1.0, 1.0, 3.0))
    value = np.zeros((6, 5, 4), np.uint8)
    value[0, 0, 0] = 4
    _save(root / "labelsTr" / "value.nii.gz", value)
    nan = np.ones((6, 5, 4), np.float32)
    nan[1, 1, 1] = np.inf
    _save(root / "imagesTr" / "nan_0001.nii.gz", nan)
    (root / "imagesTr" / "corrupt_0000.nii.gz").write_bytes(b"garbage, not NIfTI")
    (root / "imagesTr" / "onechannel_0001.nii.gz").unlink()
    _save(root / "labelsTr" / "orphan.nii.gz", np.zeros((6, 5, 4), np.uint8))
    (root / "imagesTs" / "t_0001.nii.gz").unlink()

    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 7}))

    problems = check_dataset(root)
    by_file = {}
    for p in problems:
        by_file.setdefault(p.file.split("/")[-1], []).append(p)
    expected = {
        "nolabel.nii.gz": "the label of training image",
        "shape.nii.gz": "spatial shape",
        "spacing.nii.gz": "the spacing of spacing_0000.nii.gz",
        "value.nii.gz": "label values in dataset.json [0, 1]",
        "nan_0001.nii.gz": "finite voxel values",
        "corrupt_0000.nii.gz": "a readable NIfTI file",
        "onechannel_0001.nii.gz": "channel file onechannel_0001.nii.gz",
        "orphan.nii.gz": "a training image orphan_0000.nii.gz",
        "t_0001.nii.gz": "channel file t_0001.nii.gz",
    }
    assert set(by_file) == set(expected) | {"dataset.json"}, [str(p) for p in problems]
    for name, fragment in expected.items():
        assert any(fragment in p.expected for p in by_file[name]), (name, [str(p) for p in by_file[name]])
    assert by_file["dataset.json"][0].found == "7"  # 8 cases have images
    assert "values [4]" in by_file["value.nii.gz"][0].found
    assert "shape (6, 5, 3)" in by_file["shape.nii.gz"][0].found

    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{len(problems)} problem(s)" in out and out.count("\n  - ") == len(problems)


def test_missing_dataset_json_and_bad_labels(tmp_path):
    (tmp_path / "x").mkdir()
    problems = check_dataset(tmp_path / "x")
    assert len(problems) == 1 and problems[0].file.endswith("dataset.json")
    root = _dataset(tmp_path / "y", cases=("a",))
    (root / "dataset.json").write_text(json.dumps({"labels": {"organ": "x"}, "channel_names": {}}))
    found = {p.expected.split(" (")[0] for p in check_dataset(root)}
    assert len(found) == 2  # both the labels and the channel names are reported


def test_label_values_with_a_gap_are_refused_with_the_renumbering(tmp_path, capsys):
    root = _dataset(tmp_path / "gap", cases=("a",))
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "gland", "4": "lesion"},
                                                   "modality": {"0": "T1", "1": "T2"}}))
    problems = check_dataset(root)
    assert [p.expected for p in problems] == ["consecutive label values 0..2"]
    assert problems[0].fix.endswith("(4 -> 2)")
    assert main(["data", "split", str(root)]) == 2  # every command reading the dataset refuses it alike
    assert "consecutive label values 0..2" in capsys.readouterr().err


def test_non_nifti_file_ending_is_one_problem_naming_the_conversion(tmp_path, capsys):
    root = _dataset(tmp_path / "png", cases=("a",))
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".png"}))
    problems = check_dataset(root)
    assert [(p.file.split("/")[-1], p.found) for p in problems] == [("dataset.json", "'.png'")]
    assert "convert the images and labels to NIfTI" in problems[0].fix
    assert main(["plan", str(root)]) == 2
    assert "expected file_ending .nii.gz or .nii" in capsys.readouterr().err


def test_an_unreadable_first_image_is_reported_once(tmp_path):
    root = _dataset(tmp_path / "first", cases=("a", "b"))
    (root / "imagesTr" / "a_0000.nii.gz").write_bytes(b"garbage, not NIfTI")
    problems = check_dataset(root)
    assert [p.file.split("/")[-1] for p in problems] == ["a_0000.nii.gz"]
