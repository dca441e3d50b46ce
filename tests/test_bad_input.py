"""Malformed files, impossible output paths, harmful datasets, loose types: each a clean refusal with a message."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pytest
from test_predict import _checkpoint

from augsearch.cli import main
from augsearch.data.check import check_dataset, format_report
from augsearch.data.dataset import read_dataset_info
from augsearch.policy.presets import POLICIES_DIR

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.toml"
PRESET = POLICIES_DIR / "presets" / "flips-tta-2d.json"
NOT_UTF8 = b'{"format": "\xff\xfe"}'
DEEP_JSON = "[" * 100_000 + "]" * 100_000


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))


def _dataset(root: Path, cases: int = 5, *, shape=(12, 12, 8), label=None, dims=None) -> Path:
    """A 3D one-channel dataset; LABEL(i) gives case i's label map (default: a small foreground cube)."""
    rng = np.random.default_rng(0)
    meta = {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "CT"}}
    if dims is not None:
        meta["dims"] = dims
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for i in range(cases):
        _save(root / "imagesTr" / f"c{i}_0000.nii.gz", rng.normal(size=shape).astype(np.float32))
        mask = np.zeros(shape, np.uint8)
        mask[2:6, 2:6, 2:6] = 1
        _save(root / "labelsTr" / f"c{i}.nii.gz", label(i) if label else mask)
    return root


def _train(root: Path, out: Path, *extra: str) -> int:
    sets = [f"data.root={json.dumps(str(root))}", "train.patch_size=[8, 8, 8]", "train.epochs=1",
            "train.iterations=1", "model.depth=2", *extra]
    return main(["train", str(SMOKE), "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]])


# ----------------------------------------------------------------------------------------------- malformed text


@pytest.mark.parametrize("content, fragment", [(NOT_UTF8, "not UTF-8"), (DEEP_JSON.encode(), "nested too deeply")],
                         ids=["not-utf8", "deep"])
def test_policy_file_not_utf8_or_deeply_nested(tmp_path, capsys, content, fragment):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    assert main(["policy", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert fragment in out and out.count(str(path)) == 1  # the path named once


@pytest.mark.parametrize("content, fragment", [(b'name = "\xff"\n', "not UTF-8"),
                                               (("a = " + DEEP_JSON).encode(), "nested too deeply")],
                         ids=["not-utf8", "deep"])
def test_config_not_utf8_or_deeply_nested(tmp_path, capsys, content, fragment):
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    assert main(["config", "show", str(path)]) == 2
    assert fragment in capsys.readouterr().err


def test_deeply_nested_override_is_a_string_not_a_crash(capsys):
    assert main(["config", "show", str(SMOKE), "--set", "train.epochs=" + "[" * 5000 + "]" * 5000]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and len(err) < 2000  # the value is quoted, briefly


@pytest.mark.parametrize("content, fragment", [(NOT_UTF8, "not UTF-8"), (DEEP_JSON.encode(), "nested too deeply")],
                         ids=["not-utf8", "deep"])
def test_dataset_json_not_utf8_or_deeply_nested(tmp_path, content, fragment):
    root = _dataset(tmp_path / "d", cases=1)
    (root / "dataset.json").write_bytes(content)
    (problem,) = check_dataset(root)
    assert fragment in problem.found


# ----------------------------------------------------------------------------------------------- output paths


def test_outputs_under_a_regular_file_are_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "FILE"
    blocker.write_text("a file, not a folder")
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2)
    image = tmp_path / "a.nii.gz"
    _save(image, np.zeros((20, 20), np.float32))
    commands = [
        ["predict", "--model", str(ckpt), "--input", str(image), "--output", str(blocker / "sub"), "--device", "cpu"],
        ["policy", "show", str(PRESET), "--png", str(blocker / "x.png")],
        ["bench", "augment", "--quick", "--json", str(blocker / "x.json")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{blocker} is a file, not a folder" in err, err
    assert main(["predict", "--model", str(ckpt), "--input", str(image), "--output", str(blocker)]) == 2
    assert "it is a file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- harmful datasets


def test_float64_volume_that_overflows_float32_is_reported_and_refused(tmp_path, capsys):
    root = _dataset(tmp_path / "d")
    huge = np.ones((12, 12, 8), np.float64)
    huge[0, 0, 0] = 1e300  # finite as float64, inf as the float32 the model sees
    _save(root / "imagesTr" / "c3_0000.nii.gz", huge)
    problems = check_dataset(root)
    assert [p.file.split("/")[-1] for p in problems] == ["c3_0000.nii.gz"]
    assert "float32 range" in problems[0].found
    out = tmp_path / "run"
    assert _train(root, out) == 2
    assert "float32 range" in capsys.readouterr().err
    assert not out.exists()  # a refused train leaves no run folder


def test_dataset_without_any_foreground_is_reported_and_refused(tmp_path, capsys):
    root = _dataset(tmp_path / "d", label=lambda i: np.zeros((12, 12, 8), np.uint8))
    problems = check_dataset(root)
    assert len(problems) == 1 and "only background in all 5 label maps" in problems[0].found
    out = tmp_path / "run"
    assert _train(root, out) == 2
    assert "only background" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("dims", ["two", 2.5, True, 4])
def test_dims_in_dataset_json_must_be_2_or_3(tmp_path, dims):
    root = _dataset(tmp_path / "d", cases=1, dims=dims)
    with pytest.raises(Exception, match='"dims" 2 or 3') as err:
        read_dataset_info(root)
    assert type(err.value).__name__ == "DatasetError"
    assert any('"dims" 2 or 3' in p.expected for p in check_dataset(root))


def test_3d_dataset_declared_2d_reports_one_line_per_cause(tmp_path):
    root = _dataset(tmp_path / "d", cases=12, dims=2)
    problems = check_dataset(root)
    report = format_report(root, problems)
    lines = report.splitlines()[1:]
    assert len(problems) >= 12 and len(lines) <= 3, report
    assert f"{len(problems)} problem(s)" in report and "12 files (" in report


# ----------------------------------------------------------------------------------------------- types, models


@pytest.mark.parametrize("override, fragment", [("train.epochs=true", "valid integer"),
                                                ("model.deep_supervision=1", "valid boolean"),
                                                ("train.lr=false", "valid number")])
def test_booleans_and_numbers_are_not_interchangeable(capsys, override, fragment):
    assert main(["config", "show", str(SMOKE), "--set", override]) == 2
    assert fragment in capsys.readouterr().err


def test_numbers_still_fill_float_fields(capsys):
    assert main(["config", "show", str(SMOKE), "--set", "train.lr=1", "--set", "train.epochs=3"]) == 0


def test_overrides_after_one_set_are_told_each_needs_its_own(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["config", "show", str(SMOKE), "--set", "train.lr=1", "train.epochs=3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "augsearch config: error: unrecognized arguments: train.epochs=3" in err
    assert "each KEY=VALUE needs its own --set: --set train.epochs=3" in err
    with pytest.raises(SystemExit):
        main(["config", "show", str(SMOKE), "--bogus"])
    assert "own --set" not in capsys.readouterr().err


def test_2d_model_given_a_3d_volume_names_the_dimensions(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", 2)
    image = tmp_path / "vol.nii.gz"
    _save(image, np.zeros((20, 20, 48), np.float32))
    assert main(["predict", "--model", str(ckpt), "--input", str(image), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "3D volume" in err and "the model is 2D" in err
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint_says_truncated(tmp_path, capsys):
    data = Path(_checkpoint(tmp_path / "ckpt.pt", 2)).read_bytes()
    image = tmp_path / "a.nii.gz"
    _save(image, np.zeros((20, 20), np.float32))
    for size in (0, 100, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.pt").write_bytes(data[:size])
        assert main(["predict", "--model", str(tmp_path / "cut.pt"), "--input", str(image),
                     "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "is truncated" in err and "Invalid argument" not in err, err


def test_type_error_in_a_policy_file_quotes_the_value_briefly(tmp_path, capsys):
    doc = json.loads(PRESET.read_text())
    doc["dims"] = "x" * 20_000
    doc["tea"]["top_k"] = list(range(5_000))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    assert main(["policy", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and len(out) < 2000, len(out)



@pytest.mark.timeout(60)
def test_a_device_given_as_a_policy_or_config_is_refused_not_read_forever(tmp_path, capsys):
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    assert main(["policy", "validate", str(link)]) == 1
    assert "not a regular file" in capsys.readouterr().out
    assert main(["config", "show", str(link)]) == 2


@pytest.mark.parametrize("override, fragment", [("train.lr=inf", "finite number"), ("loss.margin=nan", "finite number"),
                                                ("train.patch_size=[0, -1]", "greater than 0"),
                                                ("train.patch_size=[64]", "at least 2 items"),
                                                ("data.preprocess.target_spacing=[1, 0]", "greater than 0")])
def test_config_numbers_are_finite_and_sizes_positive(capsys, override, fragment):
    assert main(["config", "show", str(SMOKE), "--set", override]) == 2
    assert fragment in capsys.readouterr().err


def test_nan_voxel_spacing_is_reported(tmp_path):
    root = _dataset(tmp_path / "d", cases=2)
    header = nibabel.Nifti1Header()
    header.set_data_shape((12, 12, 8))
    header.set_data_dtype(np.float32)
    header["pixdim"][1] = np.nan
    nibabel.save(nibabel.Nifti1Image(np.ones((12, 12, 8), np.float32), None, header=header),
                 str(root / "imagesTr" / "c1_0000.nii.gz"))
    (problem,) = check_dataset(root)
    assert "positive, finite voxel spacing" in problem.expected and "nan" in problem.found


def test_output_piped_into_a_reader_that_leaves_ends_quietly():
    import signal
    import subprocess
    import sys

    # `augsearch config show | head -1`: the reader is gone before the JSON is written.
    proc = subprocess.Popen([sys.executable, "-m", "augsearch", "config", "show"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert stderr == ""
