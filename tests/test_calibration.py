"""`augsearch calibrate`, quality.csv from `augsearch predict`, estimates beside truth in `augsearch evaluate`."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from augsearch.artifacts.checkpoint import save_checkpoint
from augsearch.cli import main
from augsearch.config import PreprocessConfig
from augsearch.data.dataset import dataset_fingerprint, read_dataset_info
from augsearch.data.synthetic import write_benchmark
from augsearch.model import UNet, model_config
from augsearch.policy.init import make_policy
from augsearch.policy.io import save_policy
from augsearch.predict.estimate import ESTIMATORS

LABELS = {"background": 0, "organ": 1, "lesion": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained 2D model on a 6-case benchmark (val case_002, case_003; test case_004, case_005)."""
    root = tmp_path_factory.mktemp("calib")
    data = write_benchmark(root / "data", dims=2, cases=6, train_cases=2, size=32, seed=0)
    torch.manual_seed(0)
    model = UNet(2, 1, len(LABELS), base_features=4, depth=2)
    config = {"data": {"root": str(data)}}
    save_checkpoint(
        root / "run" / "checkpoint.pt", model=model, model_config=model_config(model), config=config,
        label_names=LABELS, preprocess=PreprocessConfig(normalization="zscore").model_dump(mode="json"),
        patch_size=[16, 16], epoch=1, step=1, optimizers={}, policy=None, metrics={}, generators={},
        data_fingerprint=dataset_fingerprint(read_dataset_info(data)),
    )
    return root


def test_calibrate_predict_evaluate(model_dir, capsys):
    run, data = model_dir / "run", model_dir / "data"
    assert main(["calibrate", str(run), "--device", "cpu"]) == 0
    document = json.loads((run / "estimator.json").read_text())
    assert document["val_cases"] == json.loads((data / "splits.json").read_text())["val"]
    assert set(document["estimators"]) == set(ESTIMATORS) and document["default"] == "CS-ATC"
    assert main(["calibrate", str(run)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err

    out = model_dir / "pred"
    assert main(["predict", "--model", str(run), "--input", str(data / "imagesTs"), "--output", str(out),
                 "--device", "cpu", "--estimate", "CS-TS"]) == 0
    quality = list(csv.DictReader((out / "quality.csv").read_text().splitlines()))
    assert [(r["case"], r["class"], r["estimator"]) for r in quality] == [
        (c, name, "CS-TS") for c in ("case_004", "case_005") for name in ("organ", "lesion")]
    assert all(0.0 <= float(r["estimated_dice"]) <= 1.0 for r in quality)

    gt = model_dir / "gt"
    gt.mkdir()
    for case in ("case_004", "case_005"):
        (gt / f"{case}.nii.gz").write_bytes((data / "labelsTr" / f"{case}.nii.gz").read_bytes())
    table = model_dir / "eval.csv"
    assert main(["evaluate", "--pred", str(out), "--gt", str(gt), "--labels", str(data / "dataset.json"),
                 "--out", str(table)]) == 0
    assert "mean absolute error" in capsys.readouterr().out
    rows = list(csv.DictReader(table.read_text().splitlines()))
    for row in rows:
        assert float(row["abs_error"]) == pytest.approx(abs(float(row["estimated_dice"]) - float(row["dice"])))


def test_served_summary_reports_the_estimate_predict_writes(model_dir):
    serve = pytest.importorskip("augsearch.service.serve")
    run, data = model_dir / "run", model_dir / "data"
    if not (run / "estimator.json").exists():
        assert main(["calibrate", str(run), "--device", "cpu"]) == 0
    save_policy(make_policy(2, LABELS, tea_init="flips", tea_top_k=2), run / "policy.json")
    info = serve.load_model_info(f"m={run}")
    upload = serve.inspect_upload((data / "imagesTs" / "case_004_0000.nii.gz").read_bytes(), info,
                                  serve.Limits.from_options(None, None))
    options = serve.parse_options([("tta", "none"), ("summary", "true")], info)
    summary = serve.LoadedModel(info, torch.device("cpu")).predict(upload, options, 4).summary
    out = model_dir / "pred_default"
    assert main(["predict", "--model", str(run), "--input", str(data / "imagesTs"), "--output", str(out),
                 "--device", "cpu", "--cases", "case_004"]) == 0
    quality = list(csv.DictReader((out / "quality.csv").read_text().splitlines()))
    assert summary["estimator"] == "CS-ATC" == quality[0]["estimator"]
    assert summary["estimated_dice"] == pytest.approx({r["class"]: float(r["estimated_dice"]) for r in quality})


def test_unknown_estimator_and_missing_file_are_refused(model_dir, tmp_path, capsys):
    args = ["predict", "--model", str(model_dir / "run"), "--input", str(model_dir / "data" / "imagesTs"),
            "--output", str(tmp_path / "out"), "--device", "cpu"]
    if not (model_dir / "run" / "estimator.json").exists():
        assert main(["calibrate", str(model_dir / "run"), "--device", "cpu"]) == 0
    assert main([*args, "--estimate", "XYZ"]) == 2
    assert "'XYZ' is not in" in capsys.readouterr().err
    (model_dir / "run" / "estimator.json").unlink()
    assert main([*args, "--estimate", "TS"]) == 2
    assert "run `augsearch calibrate`" in capsys.readouterr().err


def test_calibrate_a_model_whose_window_exceeds_the_volume(model_dir, tmp_path):
    """Volumes smaller than the training patch (32 x 32 cases, 48 x 48 window) are padded as predict pads them."""
    data = model_dir / "data"
    torch.manual_seed(0)
    model = UNet(2, 1, len(LABELS), base_features=4, depth=2)
    save_checkpoint(
        tmp_path / "run" / "checkpoint.pt", model=model, model_config=model_config(model),
        config={"data": {"root": str(data)}}, label_names=LABELS,
        preprocess=PreprocessConfig(normalization="zscore").model_dump(mode="json"), patch_size=[48, 48], epoch=1,
        step=1, optimizers={}, policy=None, metrics={}, generators={},
        data_fingerprint=dataset_fingerprint(read_dataset_info(data)),
    )
    assert main(["calibrate", str(tmp_path / "run"), "--device", "cpu"]) == 0
    document = json.loads((tmp_path / "run" / "estimator.json").read_text())
    assert document["val_cases"] == ["case_002", "case_003"] and set(document["estimators"]) == set(ESTIMATORS)
