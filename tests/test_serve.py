"""The learned-TTA endpoint over real HTTP: `augsearch serve` in a subprocess on 127.0.0.1, every route, each bad
input, and the served segmentation against `augsearch predict` on the same file."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from processes import descendants, free_port

from augsearch.artifacts.checkpoint import save_checkpoint
from augsearch.artifacts.layout import UNCERTAINTY_DIR
from augsearch.cli import main
from augsearch.config import PreprocessConfig
from augsearch.model import UNet, model_config
from augsearch.policy.init import make_policy
from augsearch.policy.io import save_policy
from augsearch.predict.files import predict_files

LABELS = {"background": 0, "organ": 1, "lesion": 2}
ROOT = Path(__file__).resolve().parents[1]
MAX_VOXELS = 40_000  # small, so the voxel bound is testable with a small upload
MAX_UPLOAD_MB = 0.25


def make_export(out: Path, dims: int, *, seed: int, target_spacing=None) -> Path:
    """An export folder as `augsearch export` writes it: a tiny U-Net checkpoint and a policy with uneven TEA
    weights (so that the learned views differ from flips and from no TTA), with provenance."""
    torch.manual_seed(seed)
    model = UNet(dims, 1, len(LABELS), base_features=4, depth=2)
    preprocess = PreprocessConfig(target_spacing=target_spacing, normalization="zscore").model_dump(mode="json")
    save_checkpoint(out / "checkpoint.pt", model=model, model_config=model_config(model), config={},
                    label_names=LABELS, preprocess=preprocess, patch_size=[16] * dims, epoch=1, step=1,
                    optimizers={}, policy=None, metrics={}, generators={}, data_fingerprint="test")
    policy = make_policy(dims, LABELS, tea_init="flips", tea_top_k=3)
    logits = torch.randn(policy.tea_logits.shape, generator=torch.Generator().manual_seed(seed))
    save_policy(policy.replace(tea_logits=logits), out / "policy.json",
                provenance={"seed": seed, "export": {"source": "test", "trial": f"trial_{seed:05d}"}})
    return out


def write_volume(path: Path, shape, spacing, *, seed: int = 0, data=None) -> Path:
    rng = np.random.default_rng(seed)
    if data is None:
        grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        data = 100 * np.exp(-3 * sum(g**2 for g in grids)) + 5 * rng.standard_normal(shape)
    affine = np.diag([*spacing, *[1.0] * (4 - len(spacing))])
    affine[:3, 3] = [-7.5, 12.0, 3.25]
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def request(url: str, data: bytes | None = None, method: str | None = None, timeout: float = 120):
    """(status, headers, body) of one HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/octet-stream"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """`augsearch serve` of a 3D and a 2D export; stopped by SIGTERM at the end, leaving no process behind."""
    tmp = tmp_path_factory.mktemp("serve")
    exports = {"organs3d": make_export(tmp / "organs3d", 3, seed=1, target_spacing=[1.5, 1.5, 2.0]),
               "slices2d": make_export(tmp / "exports" / "slices", 2, seed=2)}
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    command = [sys.executable, "-m", "augsearch", "serve", str(exports["organs3d"]),
               f"slices2d={exports['slices2d']}", "--port", str(port), "--max-voxels", str(MAX_VOXELS),
               "--max-upload-mb", str(MAX_UPLOAD_MB)]
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    ray_pids: dict[int, str] = {}
    try:
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the service did not become ready within 300 s"
            ray_pids.update({p: c for p, c in descendants(proc.pid).items() if "raylet" in c or "gcs_server" in c})
            try:
                if request(f"{url}/readyz", timeout=10)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        ray_pids.update(descendants(proc.pid))
        yield {"url": url, "exports": exports, "tmp": tmp, "proc": proc, "ray_pids": ray_pids}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
    assert code == 0, (tmp / "serve.log").read_text()[-3000:]
    assert any("raylet" in cmd for cmd in ray_pids.values()), "the service started no Ray of its own"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in ray_pids):
        time.sleep(0.5)
    left = {pid: cmd[:80] for pid, cmd in ray_pids.items() if alive(pid)}
    assert not left, f"processes left behind after SIGTERM: {left}"


def predict_cli(export: Path, volume: Path, out: Path, *, policy: str | None, top_k=None, uncertainty=False):
    """What `augsearch predict` writes for the same volume (in this process, CPU, one thread like the replica)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predict_files(export / "checkpoint.pt", volume, out, policy=policy, top_k=top_k, device="cpu",
                      uncertainty=uncertainty, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def read_nifti(blob: bytes):
    return nib.Nifti1Image.from_bytes(gzip.decompress(blob))


def assert_same_nifti(served, expected_path: Path) -> None:
    """Labels voxel for voxel; float maps (entropy, variance) to float32 rounding; geometry exactly."""
    expected = nib.load(str(expected_path))
    if expected.get_data_dtype() == np.uint8:
        np.testing.assert_array_equal(np.asarray(served.dataobj), np.asarray(expected.dataobj))
    else:
        np.testing.assert_allclose(np.asarray(served.dataobj), np.asarray(expected.dataobj), rtol=1e-5, atol=1e-6)
    assert served.get_data_dtype() == expected.get_data_dtype()
    np.testing.assert_array_equal(served.affine, expected.affine)
    np.testing.assert_array_equal(served.header.get_zooms(), expected.header.get_zooms())


# -- routes ------------------------------------------------------------------------------------------------------


def test_health_ready_and_model_list(service):
    assert request(f"{service['url']}/healthz")[:1] == (200,)
    status, _, body = request(f"{service['url']}/readyz")
    assert status == 200 and json.loads(body) == {"status": "ready", "models": {"organs3d": "cpu",
                                                                                 "slices2d": "cpu"}}
    status, _, body = request(f"{service['url']}/v1/models")
    models = {m["id"]: m for m in json.loads(body)["models"]}
    assert status == 200 and sorted(models) == ["organs3d", "slices2d"]
    organs = models["organs3d"]
    assert organs["dims"] == 3 and organs["labels"] == LABELS and organs["spacing_mm"] == [1.5, 1.5, 2.0]
    assert models["slices2d"]["dims"] == 2 and models["slices2d"]["spacing_mm"] is None
    assert organs["provenance"]["export"]["trial"] == "trial_00001"
    assert organs["policy"]["summary"].startswith("Policy(")
    learned = organs["policy"]["views"]["learned"]
    assert len(learned) == 3 and math.isclose(sum(v["weight"] for v in learned), 1.0, rel_tol=1e-6)
    assert [v["name"] for v in organs["policy"]["views"]["none"]] == ["identity"]


@pytest.mark.parametrize("tta, policy, top_k", [("learned", "policy.json", None), ("flips", "flips-tta", 2),
                                                ("none", None, None)])
def test_served_segmentation_equals_augsearch_predict_3d(service, tta, policy, top_k):
    volume = write_volume(service["tmp"] / f"ct_{tta}.nii.gz", (27, 33, 19), (1.2, 0.9, 3.1), seed=3)
    query = f"tta={tta}" + (f"&top_k={top_k}" if top_k else "")
    status, headers, body = request(f"{service['url']}/v1/models/organs3d/predict?{query}", volume.read_bytes(),
                                    method="POST")
    assert status == 200, body
    assert headers["Content-Type"] == "application/gzip" and headers["X-Augsearch-TTA"] == tta
    export = service["exports"]["organs3d"]
    out = predict_cli(export, volume, service["tmp"] / f"cli_{tta}",
                      policy=str(export / policy) if policy == "policy.json" else policy, top_k=top_k)
    assert_same_nifti(read_nifti(body), out / volume.name)
    views = headers["X-Augsearch-Views"].split(",")
    assert len(views) == {"learned": 3, "flips": 2, "none": 1}[tta]


def test_uncertainty_archive_2d_uncompressed_upload(service):
    volume = write_volume(service["tmp"] / "slice.nii", (37, 21, 1), (0.7, 1.3, 5.0), seed=4)
    status, headers, body = request(f"{service['url']}/v1/models/slices2d/predict?uncertainty=true",
                                    volume.read_bytes(), method="POST")
    assert status == 200 and headers["Content-Type"] == "application/zip", body[:500]
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert sorted(archive.namelist()) == ["entropy.nii.gz", "segmentation.nii.gz", "summary.json",
                                          "variance.nii.gz"]
    export = service["exports"]["slices2d"]
    out = predict_cli(export, volume, service["tmp"] / "cli_unc", policy=str(export / "policy.json"),
                      uncertainty=True)
    # the CLI keeps its uncertainty maps apart from the segmentations (OUTPUT/uncertainty/) and ends them as its
    # input (.nii); the service always answers .nii.gz
    for name, cli_file in (("segmentation", out / "slice.nii"),
                           ("entropy", out / UNCERTAINTY_DIR / "slice_entropy.nii"),
                           ("variance", out / UNCERTAINTY_DIR / "slice_variance.nii")):
        assert_same_nifti(read_nifti(archive.read(f"{name}.nii.gz")), cli_file)
    summary = json.loads(archive.read("summary.json"))
    labels = np.asarray(nib.load(str(out / "slice.nii")).dataobj)
    voxel_mm3 = 0.7 * 1.3 * 5.0
    assert summary["model"] == "slices2d" and summary["tta"] == "learned" and summary["shape"] == [37, 21, 1]
    for name, value in LABELS.items():
        assert summary["volumes_mm3"][name] == pytest.approx((labels == value).sum() * voxel_mm3, rel=1e-6)
    entropy = np.asarray(nib.load(str(out / UNCERTAINTY_DIR / "slice_entropy.nii")).dataobj)
    assert summary["mean_entropy"] == pytest.approx(float(entropy.mean()), rel=1e-4)
    assert [v["name"] for v in summary["views"]] == headers["X-Augsearch-Views"].split(",")


def test_summary_without_uncertainty(service):
    volume = write_volume(service["tmp"] / "small.nii.gz", (20, 18, 16), (1.5, 1.5, 2.0), seed=5)
    status, _, body = request(f"{service['url']}/v1/models/organs3d/predict?summary=1&tta=none",
                              volume.read_bytes(), method="POST")
    assert status == 200
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert sorted(archive.namelist()) == ["segmentation.nii.gz", "summary.json"]
    summary = json.loads(archive.read("summary.json"))
    counts = np.bincount(np.asarray(read_nifti(archive.read("segmentation.nii.gz")).dataobj).ravel(), minlength=3)
    assert sum(summary["volumes_mm3"].values()) == pytest.approx(counts.sum() * 4.5)
    assert "mean_entropy" not in summary and summary["views"] == [{"name": "identity", "weight": 1.0}]


# -- bad input: 4xx with {"error", "expected", "received"} -------------------------------------------------------


def nifti_bytes(data, spacing=(1.0, 1.0, 2.0), compress=True) -> bytes:
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([*spacing, 1.0]))
    blob = img.to_bytes()
    return gzip.compress(blob) if compress else blob


def _nan_volume():
    data = np.ones((20, 18, 16), np.float32)
    data[3, 4, 5] = np.nan
    return data


def _zero_spacing():
    blob = bytearray(nifti_bytes(np.ones((20, 18, 16)), compress=False))
    blob[80:84] = np.float32(0.0).tobytes()  # pixdim[1], the x voxel size
    return bytes(blob)


BAD = [
    ("not nifti", "organs3d", "", b"hello, this is not an image", 415, "not a NIfTI"),
    ("broken gzip", "organs3d", "", b"\x1f\x8b\x08\x00garbage", 415, "gzip"),
    ("empty body", "organs3d", "", b"", 400, "empty"),
    ("2D upload to a 3D model", "organs3d", "", nifti_bytes(np.ones((20, 18))), 422, ""),
    ("two channels", "organs3d", "", nifti_bytes(np.ones((20, 18, 16, 2))), 422, "channel"),
    ("NaN voxels", "organs3d", "", nifti_bytes(_nan_volume()), 422, "non-finite"),
    ("zero voxel size", "organs3d", "", _zero_spacing(), 422, "voxel size"),
    ("too many voxels", "organs3d", "", nifti_bytes(np.zeros((40, 40, 30))), 413, "too large"),
    ("upload too large", "organs3d", "", os.urandom(300_000), 413, "upload too large"),
    ("unknown model", "nope", "", nifti_bytes(np.ones((20, 18, 16))), 404, "unknown model"),
    ("bad tta", "organs3d", "?tta=rotations", nifti_bytes(np.ones((20, 18, 16))), 400, "tta"),
    ("top_k too large", "organs3d", "?top_k=99", nifti_bytes(np.ones((20, 18, 16))), 400, "top_k"),
    ("top_k not a number", "organs3d", "?top_k=two", nifti_bytes(np.ones((20, 18, 16))), 400, "top_k"),
    ("top_k without tta", "organs3d", "?tta=none&top_k=2", nifti_bytes(np.ones((20, 18, 16))), 400, "top_k"),
    ("bad boolean", "organs3d", "?uncertainty=maybe", nifti_bytes(np.ones((20, 18, 16))), 400, "boolean"),
    ("unknown option", "organs3d", "?views=4", nifti_bytes(np.ones((20, 18, 16))), 400, "unknown query"),
]


@pytest.mark.parametrize("what, model, query, body, status, word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_json_4xx(service, what, model, query, body, status, word):
    code, headers, answer = request(f"{service['url']}/v1/models/{model}/predict{query}", body, method="POST")
    assert code == status, answer
    assert headers["Content-Type"] == "application/json"
    error = json.loads(answer)
    assert sorted(error) == ["error", "expected", "received"] and all(error.values())
    assert word.lower() in json.dumps(error).lower()
    assert "Traceback" not in answer.decode()


def test_unknown_route_and_method(service):
    code, _, answer = request(f"{service['url']}/v2/everything")
    assert code == 404 and sorted(json.loads(answer)) == ["error", "expected", "received"]
    code, _, answer = request(f"{service['url']}/v1/models/organs3d/predict")
    assert code == 405 and "POST /v1/models/{id}/predict" in json.loads(answer)["expected"]


def test_service_still_answers_after_bad_input(service):
    status, _, body = request(f"{service['url']}/readyz")
    assert status == 200, body


# -- the CLI refuses before starting anything --------------------------------------------------------------------


def test_cli_refuses_bad_export_folders(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    make_export(tmp_path / "half", 2, seed=0)
    (tmp_path / "half" / "policy.json").unlink()
    assert main(["serve", str(tmp_path / "half")]) == 2
    assert "no policy.json" in capsys.readouterr().err
    make_export(tmp_path / "a" / "same", 2, seed=0)
    make_export(tmp_path / "b" / "same", 2, seed=0)
    assert main(["serve", str(tmp_path / "a" / "same"), str(tmp_path / "b" / "same")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "a" / "same"), "--replicas", "0"]) == 2
    assert "--replicas" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "a" / "same"), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "a" / "same"), "--port", "99999"]) == 2
    assert "--port must be a TCP port in 1..65535, got 99999" in capsys.readouterr().err


# -- stopping ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when, ready_line, exit_code", [("serving", "Ctrl-C stops", 0),
                                                          ("deploying", "Started Serve in namespace", 130)])
def test_sigterm_to_the_whole_process_group_stops_without_waiting_on_serve(tmp_path, when, ready_line, exit_code):
    """systemd and `kill -- -PGID` signal the service's whole process group, Ray's helpers included: the service
    stops without Serve's 30 s controller timeout or Ray's 60 s GCS timeout (status 1) and leaves nothing of its
    session behind; stopped before it serves, it says it was interrupted."""
    export = make_export(tmp_path / "slices", 2, seed=3)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "augsearch", "serve", str(export), "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while ready_line not in log_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            session = descendants(proc.pid)
            assert any("raylet" in cmd for cmd in session.values()), "the service started no Ray of its own"
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log_path.read_text()
    assert code == exit_code, text[-3000:]
    assert "failed to shut down" not in text and "Failed to connect to GCS" not in text, text[-3000:]
    assert ("augsearch serve: interrupted" in text) == (when == "deploying"), text[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in session):
        time.sleep(0.5)
    assert not {pid: cmd[:80] for pid, cmd in session.items() if alive(pid)}
