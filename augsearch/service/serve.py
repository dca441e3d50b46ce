"""The learned-TTA inference endpoint: exported (segmenter, policy) pairs served over HTTP by Ray Serve.

Two deployments form the application:
- `Endpoint`, the HTTP ingress (FastAPI): routes, query options, the upload and voxel bounds, the NIfTI header
  check, JSON errors. It holds no model and takes no CPU slot.
- `Segmenter`, the replicas that predict: every export is one multiplexed model (`serve.multiplexed`), loaded on
  first use and kept in an LRU of `models_per_replica`; Serve routes a model's requests to replicas that already
  hold it. Multiplexing rather than one deployment per model: replicas (and their GPU fractions) are shared by all
  models, so a rarely used model costs no idle replica, and the replica count is one knob for the whole service.

A prediction is `augsearch predict` on the uploaded file: `check_inputs` and `predict_case` of
augsearch.predict.files with the CLI's defaults, and the files `write_case` writes, so the served segmentation equals
the CLI's. Requests are not batched together: one request's windows are already batched (all TTA views together),
and on a CPU larger batches do not run faster per window (experiments/serve/README.md).

Routes:
    POST /v1/models/{id}/predict   body: one NIfTI file (.nii or .nii.gz bytes); query: tta=learned|flips|none,
                                   top_k=K, uncertainty=true|false, summary=true|false.
                                   -> application/gzip: the segmentation (.nii.gz, uint8 labels, the input's affine
                                   and header); with uncertainty or summary -> application/zip holding
                                   segmentation.nii.gz, entropy.nii.gz and variance.nii.gz (uncertainty) and
                                   summary.json (views and weights, volume per class in mm^3, mean entropy,
                                   and estimated Dice per class when the export has an estimator.json).
    GET  /v1/models                -> {"models": [{id, labels, dims, spacing_mm, policy, provenance, ...}]}
    GET  /healthz                  -> 200 while the ingress answers
    GET  /readyz                   -> 200 once every model is loaded on a replica, else 503
Refused requests get a 4xx and {"error": ..., "expected": ..., "received": ...}.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at run time.
import asyncio
import gzip
import io
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The service starts its own local Ray; Ray keeps every server of it on 127.0.0.1 only when this is set before ray
# is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from ray import serve  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from augsearch.artifacts.checkpoint import load_checkpoint  # noqa: E402
from augsearch.artifacts.layout import CHECKPOINT_NAME, POLICY_NAME  # noqa: E402
from augsearch.devices import resolve_device  # noqa: E402
from augsearch.errors import AugsearchError, DatasetError  # noqa: E402
from augsearch.ops.tea import tea_pool  # noqa: E402
from augsearch.policy.io import read_policy_document  # noqa: E402
from augsearch.policy.presets import policy_from_file_or_preset  # noqa: E402
from augsearch.predict.calibration import estimator_for_model  # noqa: E402
from augsearch.predict.files import InputCase, check_inputs, predict_case, write_case  # noqa: E402
from augsearch.predict.tta import selected_views  # noqa: E402
from augsearch.tune.ray_tune import ray_session  # noqa: E402
from augsearch.tune.reaper import one_ends_within, running_children  # noqa: E402

APP_NAME = "augsearch"
TTA_MODES = ("learned", "flips", "none")
DEFAULT_MAX_UPLOAD_MB = 256.0
DEFAULT_MAX_VOXELS = 2**25  # 512 x 512 x 128; a prediction holds (views x classes) float32 maps of this size
# Header extensions before the voxel data; a larger vox_offset is a malformed (or hostile) file.
MAX_VOX_OFFSET = 16 * 2**20
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NIFTI_MAGIC = {348: b"n+1", 540: b"n+2"}
logger = logging.getLogger("ray.serve")


class ServeError(AugsearchError):
    """Export folders or service options that cannot be served (raised before anything starts)."""


class RequestError(AugsearchError):
    """A refused request: its HTTP status, what was wrong, what the endpoint expected and what it received."""

    def __init__(self, status: int, error: str, expected: str, received: str) -> None:
        super().__init__(f"{error} (expected {expected}; received {received})")
        self.status, self.error, self.expected, self.received = status, error, expected, received

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error, "expected": self.expected, "received": self.received}


@dataclass(frozen=True)
class Limits:
    """Bounds on one request: bytes uploaded, and voxels (all axes, channels included) of the volume."""

    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20)
    max_voxels: int = DEFAULT_MAX_VOXELS

    @classmethod
    def from_options(cls, max_upload_mb: float | None, max_voxels: int | None) -> "Limits":
        """From the CLI's --max-upload-mb and --max-voxels (None: the default)."""
        return cls(int((DEFAULT_MAX_UPLOAD_MB if max_upload_mb is None else max_upload_mb) * 2**20),
                   DEFAULT_MAX_VOXELS if max_voxels is None else max_voxels)


@dataclass(frozen=True)
class PredictOptions:
    """Query options of a prediction. top_k None: the policy's own K."""

    tta: str = "learned"
    top_k: int | None = None
    uncertainty: bool = False
    summary: bool = False

    @property
    def archive(self) -> bool:
        return self.uncertainty or self.summary


@dataclass(frozen=True)
class Upload:
    """What the NIfTI header of an upload says; data is the file as uploaded."""

    data: bytes
    compressed: bool
    shape: tuple[int, ...]
    zooms: tuple[float, ...]

    def describe(self) -> str:
        return f"shape {self.shape}, voxel size {tuple(round(z, 4) for z in self.zooms)} mm"


@dataclass
class ModelInfo:
    """One served export, as plain data (it travels to every replica).

    spacing_mm: the checkpoint's target spacing (inputs are resampled to it), None when it keeps the file's.
    views: per TTA mode, the default views as (name, weight). max_top_k: per mode, the largest top_k.
    """

    id: str
    path: str
    dims: int
    in_channels: int
    labels: dict[str, int]
    spacing_mm: list[float] | None
    patch_size: list[int]
    policy_summary: str
    views: dict[str, list[tuple[str, float]]]
    max_top_k: dict[str, int]
    provenance: dict[str, Any] = field(default_factory=dict)

    def expects(self) -> str:
        """The input this model takes, in words (the `expected` of input errors)."""
        layout = "(X, Y, Z)" if self.dims == 3 else "(X, Y) or (X, Y, 1)"
        channels = "" if self.in_channels == 1 else f" with {self.in_channels} channels last"
        return (f"a {self.dims}D NIfTI volume {layout}{channels}, finite values; it is resampled to "
                f"{self.spacing_mm or 'its own'} mm spacing and zero-padded where an axis is shorter than the patch "
                f"{self.patch_size}")

    def describe(self) -> dict[str, Any]:
        """The entry of GET /v1/models."""
        return {
            "id": self.id, "labels": self.labels, "dims": self.dims, "in_channels": self.in_channels,
            "spacing_mm": self.spacing_mm, "patch_size": self.patch_size, "tta_modes": list(TTA_MODES),
            "policy": {"summary": self.policy_summary,
                       "views": {mode: [{"name": n, "weight": w} for n, w in views] for mode, views in
                                 self.views.items()},
                       "max_top_k": self.max_top_k},
            "provenance": self.provenance,
        }


# -- export folders ----------------------------------------------------------------------------------------------


def tta_policies(export_dir: Path, dims: int, labels: Mapping[str, int]) -> dict[str, Any]:
    """The policy of each TTA mode, as `augsearch predict --policy` loads it (None: no TTA)."""
    return {"learned": policy_from_file_or_preset(export_dir / POLICY_NAME, dims, labels),
            "flips": policy_from_file_or_preset("flips-tta", dims, labels),
            "none": None}


def _views(policy: Any, dims: int, top_k: int | None = None) -> list[tuple[str, float]]:
    ids, weights = selected_views(policy, dims, top_k)
    pool = tea_pool(dims)
    return [(pool[i].name, float(w)) for i, w in zip(ids, weights, strict=True)]


def _split_spec(spec: str) -> tuple[str, Path]:
    """'DIR' (id: the folder name) or 'ID=DIR'."""
    name, sep, rest = spec.partition("=")
    if sep and _ID.match(name) and not Path(spec).exists():
        return name, Path(rest)
    path = Path(spec)
    return path.resolve().name, path


def load_model_info(spec: str) -> ModelInfo:
    """Check one export folder (checkpoint.pt + policy.json, as `augsearch export` writes) and describe it."""
    model_id, path = _split_spec(spec)
    if not path.is_dir():
        raise ServeError(f"export folder {path} does not exist; pass a folder written by `augsearch export`")
    for name in (CHECKPOINT_NAME, POLICY_NAME):
        if not (path / name).is_file():
            raise ServeError(f"{path} has no {name}; pass a folder written by `augsearch export RUN --out DIR`")
    if not _ID.match(model_id):
        raise ServeError(f"model id {model_id!r} (from {path}) must be letters, digits, '.', '_' or '-' and start "
                         f"with a letter or digit; name it explicitly as ID={path}")
    ckpt = load_checkpoint(path / CHECKPOINT_NAME)
    dims, labels = ckpt.dims, ckpt.label_names
    policies = tta_policies(path, dims, labels)
    learned = policies["learned"]
    if len(learned.label_names) != ckpt.num_classes:
        raise ServeError(f"{path / POLICY_NAME} has {len(learned.label_names)} labels but the model outputs "
                         f"{ckpt.num_classes} classes; export the policy learned with this model")
    spacing = ckpt.preprocess.target_spacing
    return ModelInfo(
        id=model_id, path=str(path.resolve()), dims=dims, in_channels=ckpt.in_channels, labels=labels,
        spacing_mm=[float(s) for s in spacing] if spacing is not None else None,
        patch_size=ckpt.patch_size, policy_summary=learned.summary(),
        views={mode: _views(policy, dims) for mode, policy in policies.items()},
        max_top_k={mode: int(policy.tea_available.sum()) for mode, policy in policies.items() if policy is not None},
        provenance=read_policy_document(path / POLICY_NAME).get("provenance") or {},
    )


def load_model_infos(specs: Sequence[str]) -> list[ModelInfo]:
    """Every export folder checked; ids must be distinct."""
    if not specs:
        raise ServeError("no export folder given; pass one or more folders written by `augsearch export`")
    infos = [load_model_info(spec) for spec in specs]
    ids = [info.id for info in infos]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ServeError(f"model ids {repeated} are given twice (ids default to the folder name); name them "
                         f"explicitly as ID=DIR")
    return infos


# -- requests ----------------------------------------------------------------------------------------------------


def parse_options(query: Sequence[tuple[str, str]], info: ModelInfo) -> PredictOptions:
    """Query parameters of a predict request -> PredictOptions; RequestError(400) for anything else."""
    known = ("tta", "top_k", "uncertainty", "summary")
    values: dict[str, str] = {}
    for key, value in query:
        if key not in known:
            raise RequestError(400, f"unknown query parameter {key!r}", f"parameters among {list(known)}", key)
        if key in values:
            raise RequestError(400, f"query parameter {key!r} given twice", "each parameter at most once", key)
        values[key] = value
    tta = values.get("tta", "learned")
    if tta not in TTA_MODES:
        raise RequestError(400, "unknown tta mode", f"tta one of {list(TTA_MODES)}", tta)
    flags = {}
    for key in ("uncertainty", "summary"):
        raw = values.get(key, "false")
        if raw.lower() not in _BOOLEANS:
            raise RequestError(400, f"{key} is not a boolean", f"{key}=true or {key}=false", raw)
        flags[key] = _BOOLEANS[raw.lower()]
    top_k = None
    if "top_k" in values:
        if tta == "none":
            raise RequestError(400, "top_k applies to test-time augmentation", "top_k with tta=learned or flips",
                               f"top_k={values['top_k']} with tta=none")
        limit = info.max_top_k[tta]
        try:
            top_k = int(values["top_k"])
        except ValueError:
            top_k = None
        if top_k is None or not 1 <= top_k <= limit:
            raise RequestError(400, "top_k out of range", f"an integer in [1, {limit}] (TEA entries of tta={tta})",
                               values["top_k"])
    return PredictOptions(tta=tta, top_k=top_k, **flags)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds `limit` bytes."""
    expected = f"at most {limit} bytes (serve --max-upload-mb)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "upload too large", expected, f"{declared} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # a body sent without Content-Length is counted as it arrives
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "upload too large", expected, f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def inspect_upload(data: bytes, info: ModelInfo, limits: Limits) -> Upload:
    """Read only the NIfTI header of an upload (gzip or not): format, voxel bound, spacing."""
    expected = "a single-file NIfTI-1 or NIfTI-2 volume (.nii or .nii.gz bytes) as the request body"
    if not data:
        raise RequestError(400, "empty request body", expected, "0 bytes")
    compressed = data[:2] == b"\x1f\x8b"
    try:
        head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(540) if compressed else data[:540]
    except (OSError, EOFError, zlib.error) as err:
        raise RequestError(415, "not a readable gzip stream", expected, f"{type(err).__name__}: {err}") from None
    header = _nifti_header(head)
    if header is None:
        raise RequestError(415, "not a NIfTI file", expected, f"{len(data)} bytes starting {data[:8]!r}")
    shape = tuple(int(n) for n in header.get_data_shape())
    voxels = math.prod(shape)
    if voxels > limits.max_voxels:
        raise RequestError(413, "volume too large", f"at most {limits.max_voxels} voxels (serve --max-voxels)",
                           f"shape {shape}, {voxels} voxels")
    if float(header["vox_offset"]) > MAX_VOX_OFFSET:
        raise RequestError(415, "header extensions too large", f"voxel data within {MAX_VOX_OFFSET} bytes",
                           f"vox_offset {float(header['vox_offset']):.0f}")
    # Spatial axes come first; a 2D file's singleton third axis keeps its slice thickness (volumes in mm^3).
    spatial = 3 if info.dims == 3 or (len(shape) >= 3 and shape[2] == 1) else 2
    zooms = tuple(float(z) for z in header["pixdim"][1 : 1 + spatial])  # as stored: nibabel would set 0 to 1
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise RequestError(422, "voxel size not positive", "positive, finite voxel sizes (pixdim) in mm",
                           f"voxel size {zooms}")
    return Upload(data, compressed, shape, zooms)


def _nifti_header(head: bytes) -> Any:
    """The NIfTI-1/2 header in the first bytes of a file, either byte order, or None when it is none."""
    import nibabel as nib

    for order in "<>":
        if len(head) < 4:
            return None
        size = struct.unpack(f"{order}i", head[:4])[0]
        if size in _NIFTI_MAGIC and len(head) >= size:
            klass = nib.Nifti1Header if size == 348 else nib.Nifti2Header
            try:
                header = klass(binaryblock=head[:size], check=False)
            except Exception:  # nibabel raises several types for inconsistent fields
                return None
            return header if bytes(header["magic"]).rstrip(b"\0") == _NIFTI_MAGIC[size] else None
    return None


# -- prediction --------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """A served prediction: .nii.gz files by name (segmentation, entropy, variance) and the summary."""

    files: dict[str, bytes]
    summary: dict[str, Any]


class LoadedModel:
    """One export on one replica: the segmenter on its device and the policy of each TTA mode."""

    def __init__(self, info: ModelInfo, device: torch.device) -> None:
        path = Path(info.path)
        self.info, self.device = info, device
        self.ckpt = load_checkpoint(path / CHECKPOINT_NAME)
        self.model = self.ckpt.build_model().to(device)
        self.policies = tta_policies(path, info.dims, info.labels)
        self.estimator = estimator_for_model(path / CHECKPOINT_NAME, None, self.ckpt.label_names)

    def predict(self, upload: Upload, options: PredictOptions, batch_size: int) -> Prediction:
        """`augsearch predict --batch-size BATCH_SIZE` of the upload with this model, its files read back."""
        with tempfile.TemporaryDirectory(prefix="augsearch-serve-") as tmp:
            source = Path(tmp) / ("upload.nii.gz" if upload.compressed else "upload.nii")
            source.write_bytes(upload.data)
            case = InputCase("segmentation", (source,))
            policy = self.policies[options.tta]
            try:
                check_inputs([case], self.info.dims, self.info.in_channels)
                prediction = predict_case(self.model, self.ckpt, case, policy, top_k=options.top_k,
                                          batch_size=batch_size, device=self.device,
                                          uncertainty=options.uncertainty, estimator=self.estimator)
            except DatasetError as err:
                raise RequestError(422, f"the volume cannot be predicted: {err.fix}", err.expected,
                                   err.found) from None
            except AugsearchError as err:
                message = str(err).replace(str(source), "the upload").replace(source.name, "the upload")
                raise RequestError(422, message, self.info.expects(), upload.describe()) from None
            files = {path.name.replace("segmentation_", ""): path.read_bytes()
                     for path in write_case(prediction, Path(tmp) / "out")}
        labels = prediction.labels
        voxel_mm3 = math.prod(upload.zooms[: labels.ndim])
        counts = np.bincount(labels.ravel(), minlength=max(self.info.labels.values()) + 1)
        summary: dict[str, Any] = {
            "model": self.info.id, "tta": options.tta, "top_k": options.top_k,
            "views": [{"name": n, "weight": w} for n, w in _views(policy, self.info.dims, options.top_k)],
            "shape": list(labels.shape), "voxel_mm3": voxel_mm3,
            "volumes_mm3": {name: float(counts[value] * voxel_mm3) for name, value in self.info.labels.items()},
        }
        if prediction.summary is not None:
            summary["mean_entropy"] = prediction.summary["mean_entropy"]
            summary["volume_cv"] = prediction.summary["volume_cv"]
        if prediction.quality is not None:
            summary["estimator"] = self.estimator.name
            summary["estimated_dice"] = {row["class"]: row["estimated_dice"] for row in prediction.quality}
        return Prediction(files, summary)


@serve.deployment
class Segmenter:
    """Replicas that predict; every export is a multiplexed model id.

    Predictions run one at a time on one worker thread of the replica: that bounds memory to one volume, gives
    torch's threads to it, and keeps the event loop free for health checks and model loads.
    """

    def __init__(self, models: list[ModelInfo], models_per_replica: int, threads: int, batch_size: int) -> None:
        torch.set_num_threads(max(1, threads))
        self._batch_size = batch_size
        infos = {info.id: info for info in models}
        device = resolve_device("auto")
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

        async def load(model_id: str) -> LoadedModel:
            return await asyncio.to_thread(LoadedModel, infos[model_id], device)

        self._model = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)

    async def ready(self) -> str:
        """Load this request's model (multiplexed id); returns its device."""
        return str((await self._model(serve.get_multiplexed_model_id())).device)

    async def predict(self, upload: Upload, options: PredictOptions) -> Prediction | dict[str, Any]:
        """The prediction, or a refused request as RequestError.as_dict() (plain data crosses replicas intact)."""
        try:
            model = await self._model(serve.get_multiplexed_model_id())
            return await asyncio.get_running_loop().run_in_executor(self._worker, model.predict, upload, options,
                                                                    self._batch_size)
        except RequestError as err:
            return err.as_dict()
        except AugsearchError as err:  # the export changed on disk after the service started
            return RequestError(503, "the model cannot be loaded", "a readable export folder", str(err)).as_dict()
        except Exception as err:  # a bug: logged here with its traceback, answered without it
            logger.exception("prediction failed")
            return RequestError(500, "internal error while predicting", "a prediction",
                                f"{type(err).__name__}: {err}").as_dict()


# -- HTTP ingress ------------------------------------------------------------------------------------------------

app = FastAPI(title="augsearch learned-TTA endpoint", docs_url=None, redoc_url=None)


@app.exception_handler(RequestError)
async def _refused(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.error, "expected": err.expected, "received": err.received},
                        status_code=err.status)


@app.exception_handler(HTTPException)
async def _no_route(request: Request, err: HTTPException) -> JSONResponse:
    routes = "POST /v1/models/{id}/predict, GET /v1/models, GET /healthz, GET /readyz"
    return JSONResponse({"error": str(err.detail), "expected": f"one of {routes}",
                         "received": f"{request.method} {request.url.path}"}, status_code=err.status_code)


@app.exception_handler(Exception)
async def _bug(request: Request, err: Exception) -> JSONResponse:
    # A bug, not the client's mistake: Serve logs the traceback; the answer carries none.
    return JSONResponse({"error": "internal error", "expected": "a request the endpoint can answer",
                         "received": f"{request.method} {request.url.path}"}, status_code=500)


def _archive(prediction: Prediction) -> bytes:
    """A zip of the .nii.gz files (stored: they are compressed already) and summary.json."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, blob in prediction.files.items():
            archive.writestr(name, blob)
        archive.writestr("summary.json", json.dumps(prediction.summary, indent=2))
    return buffer.getvalue()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Endpoint:
    """HTTP routes; checks what it can without the model, then hands the upload to a Segmenter replica."""

    def __init__(self, segmenter: Any, models: list[ModelInfo], limits: Limits) -> None:
        self._segmenter = segmenter
        self._models = {info.id: info for info in models}
        self._limits = limits

    def _model(self, model_id: str) -> ModelInfo:
        if model_id not in self._models:
            raise RequestError(404, "unknown model", f"a model id among {sorted(self._models)} (GET /v1/models)",
                               model_id)
        return self._models[model_id]

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        devices, failed = {}, {}
        for model_id in self._models:
            try:
                devices[model_id] = await self._segmenter.options(multiplexed_model_id=model_id).ready.remote()
            except Exception as err:  # a replica that cannot load the model or died: not ready
                failed[model_id] = f"{type(err).__name__}: {err}".splitlines()[0]
        if failed:
            return JSONResponse({"error": "not ready", "expected": "every model loaded on a replica",
                                 "received": failed}, status_code=503)
        return JSONResponse({"status": "ready", "models": devices})

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"models": [info.describe() for info in self._models.values()]}

    @app.post("/v1/models/{model_id}/predict")
    async def predict(self, model_id: str, request: Request) -> Response:
        info = self._model(model_id)
        options = parse_options(request.query_params.multi_items(), info)
        upload = inspect_upload(await read_body(request, self._limits.max_upload_bytes), info, self._limits)
        try:
            result = await self._segmenter.options(multiplexed_model_id=model_id).predict.remote(upload, options)
        except Exception as err:  # the replica died or Serve could not route: the request may be retried
            raise RequestError(503, "no replica could answer", "a running Segmenter replica",
                               f"{type(err).__name__}") from None
        if isinstance(result, dict):
            raise RequestError(**result)
        views = result.summary["views"]
        headers = {"X-Augsearch-Model": model_id, "X-Augsearch-TTA": options.tta,
                   "X-Augsearch-Views": ",".join(v["name"] for v in views),
                   "X-Augsearch-Weights": ",".join(f"{v['weight']:.6g}" for v in views)}
        if options.archive:
            headers["Content-Disposition"] = 'attachment; filename="prediction.zip"'
            return Response(_archive(result), media_type="application/zip", headers=headers)
        headers["Content-Disposition"] = 'attachment; filename="segmentation.nii.gz"'
        return Response(result.files["segmentation.nii.gz"], media_type="application/gzip", headers=headers)


# -- running it --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceOptions:
    """How the service runs: where it listens, replicas and their resources, request bounds.

    replicas: an int, or "auto" (Serve's autoscaling). models_per_replica: the multiplexing LRU size (None: every
    model stays loaded). batch_size: sliding windows per model call, all views together (`augsearch predict
    --batch-size`); a GPU replica gains from more (experiments/serve/README.md); results differ by float rounding at
    most.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int | str = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    models_per_replica: int | None = None
    batch_size: int = 8
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        if self.replicas != "auto" and (not isinstance(self.replicas, int) or self.replicas < 1):
            raise ServeError(f"--replicas must be a positive integer or 'auto', got {self.replicas!r}")
        if self.cpus_per_replica <= 0 or self.gpus_per_replica < 0:
            raise ServeError(f"--cpus-per-replica must be > 0 and --gpus-per-replica >= 0, got "
                             f"{self.cpus_per_replica} and {self.gpus_per_replica}")
        if not 1 <= self.port <= 65535:
            raise ServeError(f"--port must be a TCP port in 1..65535, got {self.port}")
        if self.batch_size < 1:
            raise ServeError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.models_per_replica is not None and self.models_per_replica < 1:
            raise ServeError(f"--models-per-replica must be >= 1, got {self.models_per_replica}")
        if self.limits.max_upload_bytes < 1 or self.limits.max_voxels < 1:
            raise ServeError(f"--max-upload-mb and --max-voxels must be positive, got {asdict(self.limits)}")


def build_app(models: list[ModelInfo], options: ServiceOptions) -> Any:
    """The Serve application: the Endpoint ingress bound to a Segmenter deployment."""
    segmenter = Segmenter.options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
    ).bind(models, options.models_per_replica or len(models), math.ceil(options.cpus_per_replica),
           options.batch_size)
    return Endpoint.bind(segmenter, models, options.limits)


def check_port_free(host: str, port: int) -> None:
    """ServeError when HOST:PORT cannot be bound (in use, or not an address of this machine)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as err:
        raise ServeError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host") from None


def start(models: list[ModelInfo], options: ServiceOptions) -> str:
    """Deploy the application on the Ray this process is connected to; returns the base URL once it runs."""
    options.check()
    serve.start(http_options={"host": options.host, "port": options.port}, proxy_location="HeadOnly")
    serve.run(build_app(models, options), name=APP_NAME, route_prefix="/")
    host = f"[{options.host}]" if ":" in options.host else options.host
    return f"http://{host}:{options.port}"


def shutdown() -> None:
    """Delete the application and stop Serve's controller and proxy."""
    serve.shutdown()


def run_until_stopped(models: list[ModelInfo], options: ServiceOptions, announce: Any = print) -> None:
    """Start a local Ray on 127.0.0.1, deploy, call announce(url), serve until SIGINT or SIGTERM, then shut Serve
    and Ray down. A signal during the deployment raises KeyboardInterrupt once both are down."""
    options.check()
    check_port_free(options.host, options.port)
    stop, serving = threading.Event(), threading.Event()

    def on_stop(*_: Any) -> None:
        stop.set()
        if not serving.is_set():  # leave the deployment's wait, which a Ray stopping with this process never ends
            raise KeyboardInterrupt

    with ray_session(None):
        # After ray.init, which installs a SIGTERM handler of its own that aborts the process.
        previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        helpers = running_children()
        try:
            url = start(models, options)
            serving.set()
            announce(url)
            while not stop.wait(0.5):
                pass
        finally:
            # A SIGTERM to the whole process group (systemd, `kill -- -PGID`) also ends the local Ray's own processes:
            # the GCS stops answering, and Serve's graceful shutdown would wait 30 s for a controller that cannot
            # finish; stopping Ray ends the replicas then
            if not one_ends_within(helpers, 1.0):
                shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
