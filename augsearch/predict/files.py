"""Predict NIfTI volumes with an augsearch checkpoint and a TTA policy: files in, one segmentation file per case out.

Each case is read (one file, a 4D MSD file, or nnU-Net `_0000` channel files), preprocessed as at training time (the
checkpoint's "preprocess" entry: normalisation, target spacing), predicted with `predict_tta`, resampled back to the
file's grid and written as `<case><ending>` (argmax labels, uint8) with the input's affine, header and file ending
(`.nii.gz` or `.nii`, as nnU-Net writes a dataset's `file_ending`). With uncertainty, in the subfolder `uncertainty/`
(so the output folder holds segmentations only, ready for `augsearch evaluate`): `<case>_entropy<ending>`
(predictive entropy of the aggregate, nats), `<case>_variance<ending>` (variance
across views of the foreground probability) and a summary `uncertainty.csv` (mean entropy, volume per class in mL,
coefficient of variation of the foreground volume across views). A case's files are all written, or none.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from augsearch.artifacts.checkpoint import Checkpoint, load_checkpoint
from augsearch.artifacts.layout import QUALITY_CSV, UNCERTAINTY_CSV, UNCERTAINTY_DIR
from augsearch.artifacts.output import check_output_dir
from augsearch.atomic import atomic_open, write_text
from augsearch.data.dataset import Case
from augsearch.data.nifti import CHANNEL_SUFFIX, nifti_stem, nifti_suffix, read_image
from augsearch.data.preprocess import preprocess_image, restore_to_original
from augsearch.devices import resolve_device
from augsearch.errors import AugsearchError
from augsearch.policy.presets import policy_from_file_or_preset
from augsearch.predict.calibration import estimator_for_model, quality_rows
from augsearch.predict.estimate import Estimator
from augsearch.predict.postprocess import apply_postprocess, postprocess_from_options
from augsearch.predict.tta import predict_tta


class PredictError(AugsearchError):
    """Inputs that cannot be predicted: missing or non-NIfTI files, channel or size mismatches."""


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its id and its file(s), channel files in channel order."""

    case_id: str
    paths: tuple[Path, ...]

    @property
    def file_ending(self) -> str:
        """".nii.gz" or ".nii", as the case's (first) file is named: its predictions are written so."""
        return nifti_suffix(self.paths[0]) or ".nii.gz"


@dataclass
class CasePrediction:
    """A predicted case on the file's grid, ready to write.

    labels: (*file spatial shape) uint8. entropy, variance: same shape float32, or None. summary: the CSV row.
    quality: quality.csv rows (estimated Dice per foreground class), or None.
    """

    case_id: str
    labels: np.ndarray
    entropy: np.ndarray | None
    variance: np.ndarray | None
    header: Any
    affine: np.ndarray
    summary: dict[str, Any] | None
    quality: list[dict[str, Any]] | None = None


def find_inputs(path: str | Path, cases: list[str] | None = None) -> list[InputCase]:
    """Cases under `path`: a NIfTI file, or a folder of them (channel files `<case>_NNNN` grouped by case).

    `cases` keeps only these case ids (all must exist). Raises PredictError for a missing path, a non-NIfTI file, an
    empty folder or a case whose channel files are not numbered 0000, 0001, ... without gaps.
    """
    path = Path(path)
    if not path.exists():
        raise PredictError(f"--input {path} does not exist; give a NIfTI file or a folder of NIfTI files")
    if path.is_file():
        stem = nifti_stem(path)
        if stem is None:
            raise PredictError(f"--input {path} is not a NIfTI file: expected a name ending in .nii or .nii.gz")
        found = [InputCase(stem, (path,))]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and nifti_stem(p))
        if not files:
            raise PredictError(f"--input folder {path} holds no NIfTI files (*.nii, *.nii.gz); point it at imagesTs/")
        stems = {p: nifti_stem(p) for p in files}
        matches = {p: CHANNEL_SUFFIX.match(s) for p, s in stems.items()}
        if all(matches.values()):
            groups: dict[str, dict[int, Path]] = defaultdict(dict)
            for p, match in matches.items():
                groups[match["case"]][int(match["channel"])] = p
            found = []
            for case_id, channels in sorted(groups.items()):
                if sorted(channels) != list(range(len(channels))):
                    raise PredictError(
                        f"case {case_id} in {path} has channel files {sorted(channels)}; expected _0000 to "
                        f"_{len(channels) - 1:04d} without gaps; add the missing channel file"
                    )
                found.append(InputCase(case_id, tuple(channels[c] for c in sorted(channels))))
        else:
            found = [InputCase(stems[p], (p,)) for p in files]
            ids = [c.case_id for c in found]
            duplicate = sorted({i for i in ids if ids.count(i) > 1})
            if duplicate:
                raise PredictError(f"{path} has both .nii and .nii.gz files for cases {duplicate}; keep one of each")
    if cases is not None:
        known = {c.case_id: c for c in found}
        missing = [c for c in cases if c not in known]
        if missing:
            raise PredictError(f"cases {missing} are not in {path}; it holds {sorted(known)[:5]}...")
        found = [known[c] for c in cases]
    return found


def _file_spatial_shape(shape: tuple[int, ...], dims: int) -> tuple[int, ...]:
    """Spatial shape of a segmentation file matching an input file of `shape` (channels dropped, 2D (X, Y, 1) kept)."""
    if dims == 3:
        return tuple(shape[:3])
    if len(shape) >= 3 and shape[2] == 1:
        return (shape[0], shape[1], 1)
    return tuple(shape[:2])


def _channel_count(shape: tuple[int, ...], dims: int) -> int | None:
    """Channels of a file of `shape` read as `dims`-D (as `read_image` reads it), None when the shape does not fit."""
    if dims == 3:
        return {3: 1, 4: shape[-1]}.get(len(shape))
    if len(shape) == 2:
        return 1
    if len(shape) == 3:
        return 1 if shape[2] == 1 else shape[2]
    if len(shape) == 4 and shape[2] == 1:
        return shape[3]
    return None


def check_inputs(inputs: list[InputCase], dims: int, in_channels: int) -> None:
    """Read headers only: every file is NIfTI with the model's dims and channel count (fails before any output)."""
    import nibabel as nib

    for case in inputs:
        channels, shapes = 0, []
        for path in case.paths:
            if not path.is_file():
                raise PredictError(f"{path} (case {case.case_id}) does not exist; add it or remove the case")
            try:
                shape = tuple(nib.load(str(path)).shape)
            except Exception as err:  # nibabel raises several unrelated types for non-NIfTI content
                raise PredictError(
                    f"{path} is not a readable NIfTI file ({type(err).__name__}: {err}); re-export it as NIfTI"
                ) from None
            shapes.append(shape)
            count = _channel_count(shape, dims)
            if count is None:
                raise PredictError(
                    f"{path} has shape {shape}; the model is {dims}D, so expected {dims} spatial axes, channels last"
                )
            channels += count
        if channels != in_channels and dims == 2 and any(len(s) == 3 and s[2] > 1 for s in shapes):
            raise PredictError(
                f"case {case.case_id} has shape {shapes[0]}: a 3D volume, or a 2D image with {shapes[0][2]} channels; "
                f"the model is 2D with {in_channels} channel(s); predict 3D volumes with a model trained in 3D"
            )
        if channels != in_channels:
            raise PredictError(
                f"case {case.case_id} has {channels} channel(s) in {[p.name for p in case.paths]}, the model expects "
                f"{in_channels}; give every channel file (<case>_0000, _0001, ...) or a 4D file with channels last"
            )


def _resample(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of a (*S) map to `shape`, on the corner-aligned grids of the dataset's preprocessing."""
    from scipy import ndimage

    if tuple(array.shape) == tuple(shape):
        return array.astype(np.float32)
    factors = [t / s for t, s in zip(shape, array.shape, strict=True)]
    return ndimage.zoom(array, factors, order=1, mode="nearest", grid_mode=False).astype(np.float32)


def predict_case(
    model: Any,
    ckpt: Checkpoint,
    case: InputCase,
    policy: Any,
    *,
    top_k: int | None = None,
    batch_size: int = 8,
    device: Any = None,
    overlap: float = 0.5,
    aggregate: Literal["probabilities", "logits"] = "probabilities",
    uncertainty: bool = False,
    estimator: Estimator | None = None,
) -> CasePrediction:
    """Read, preprocess, predict with TTA and restore one case to its file's grid (nothing is written).

    A volume smaller than the training patch on some axis is zero-padded to it and cropped back, as training pads.
    """

    dims = ckpt.dims
    image, spacing, affine, header = read_image(list(case.paths), dims)
    pre, new_spacing = preprocess_image(image, spacing, ckpt.preprocess)
    original = Case(case_id=case.case_id, image=pre, label=None, spacing=tuple(new_spacing),
                    original_spacing=tuple(spacing), original_shape=tuple(image.shape[1:]), affine=affine)
    del image
    try:
        result = predict_tta(
            model, pre, policy, spacing=new_spacing, top_k=top_k, window=ckpt.patch_size, batch_size=batch_size,
            device=device, overlap=overlap, aggregate=aggregate, return_uncertainty=uncertainty, pad_to_window=True,
        )
    except AugsearchError as err:
        raise PredictError(f"case {case.case_id}: {err}") from None
    probs = restore_to_original(result.probabilities.cpu().numpy(), original)
    file_shape = _file_spatial_shape(tuple(header.get_data_shape()), dims)
    labels = probs.argmax(0).astype(np.uint8).reshape(file_shape)
    entropy = variance = summary = None
    if uncertainty:
        entropy_map = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(0).astype(np.float32)
        variance_map = _resample(result.variance.cpu().numpy(), original.original_shape)
        entropy, variance = entropy_map.reshape(file_shape), variance_map.reshape(file_shape)
        summary = _summary_row(case.case_id, probs.argmax(0), entropy_map, spacing, ckpt.label_names,
                               result.view_volumes.cpu().numpy())
    quality = None if estimator is None else quality_rows(case.case_id, probs, estimator, ckpt.label_names)
    return CasePrediction(case.case_id, labels, entropy, variance, header, affine, summary, quality)


def _summary_row(case_id: str, labels: np.ndarray, entropy: np.ndarray, spacing: tuple[float, ...],
                 label_names: dict[str, int], view_volumes: np.ndarray) -> dict[str, Any]:
    """CSV row: mean entropy, volume per foreground class in mL (1 mL = 1000 mm^3), CV of the per-view volumes."""
    voxel_ml = math.prod(spacing) / 1000.0
    row: dict[str, Any] = {"case": case_id, "mean_entropy": float(entropy.mean())}
    counts = np.bincount(labels.ravel(), minlength=max(label_names.values()) + 1)
    for name, value in sorted(label_names.items(), key=lambda item: item[1]):
        if value != 0:
            row[f"volume_ml_{name}"] = float(counts[value] * voxel_ml)
    mean = float(view_volumes.mean())
    # All views empty: no variation across views.
    row["volume_cv"] = float(view_volumes.std() / mean) if mean > 0 else 0.0
    return row


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, header: Any, dtype: Any, compressed: bool) -> bytes:
    """A NIfTI-1 of `data` (gzipped when `compressed`) with the source header's geometry: affine, zooms, qform and
    sform with codes."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    source = header if isinstance(header, nib.Nifti1Header) else nib.Nifti1Header.from_header(header)
    hdr.set_data_shape(data.shape)
    hdr.set_zooms(source.get_zooms()[: data.ndim])
    hdr.set_xyzt_units(*source.get_xyzt_units())
    hdr.set_dim_info(*source.get_dim_info())
    img = nib.Nifti1Image(data.astype(dtype, copy=False), affine, header=hdr)
    img.set_qform(source.get_qform(), code=int(source["qform_code"]))
    img.set_sform(source.get_sform(), code=int(source["sform_code"]))
    if int(source["qform_code"]) == 0 and int(source["sform_code"]) == 0:
        img.set_sform(affine, code=0)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    return gzip.compress(img.to_bytes(), compresslevel=1) if compressed else img.to_bytes()


def write_case(prediction: CasePrediction, output_dir: Path, ending: str = ".nii.gz") -> list[Path]:
    """Write a case's files named `<case><ending>` (".nii.gz" or ".nii"); each atomically, and all or none (written
    ones are removed if a later one fails)."""
    compressed = ending.endswith(".gz")
    blobs = {output_dir / f"{prediction.case_id}{ending}": _nifti_bytes(
        prediction.labels, prediction.affine, prediction.header, np.uint8, compressed)}
    if prediction.entropy is not None:
        for name, data in (("entropy", prediction.entropy), ("variance", prediction.variance)):
            blobs[output_dir / UNCERTAINTY_DIR / f"{prediction.case_id}_{name}{ending}"] = _nifti_bytes(
                data, prediction.affine, prediction.header, np.float32, compressed)
    written: list[Path] = []
    try:
        for path, blob in blobs.items():
            with atomic_open(path, "wb") as handle:
                handle.write(blob)
            written.append(path)
    except BaseException:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return written


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """The per-case uncertainty CSV (atomic; columns from the union of the rows' keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def predict_files(
    checkpoint: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    policy: str | Path | None = None,
    cases: list[str] | None = None,
    top_k: int | None = None,
    batch_size: int = 8,
    device: str | None = "auto",
    overlap: float = 0.5,
    aggregate: Literal["probabilities", "logits"] = "probabilities",
    uncertainty: bool = False,
    min_component_mm3: float = 0.0,
    keep_largest: Sequence[str] = (),
    progress: bool | None = None,
    estimate: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Predict every case under `input_path` into `output_dir`; returns the written files.

    policy: a policy file or preset name (e.g. "flips-tta"), bound to the checkpoint's labels; None: no TTA, the
    plain sliding-window prediction. top_k: TEA views (default: the policy's K). Everything is checked (checkpoint,
    policy, input files' headers) before the first case is predicted. progress: tqdm bar over the cases (None: only
    on a terminal). min_component_mm3 / keep_largest (class names): connected-component clean-up of each label map on
    its file's grid (`augsearch.predict.postprocess`). estimate: estimator name for quality.csv (estimated Dice per
    class and case, `augsearch.predict.calibration`); None: the default of the model's estimator.json, if it has one.
    An output folder that holds files is refused unless `overwrite`, so two models' predictions never mix.
    """
    from tqdm import tqdm

    check_output_dir(Path(output_dir), overwrite=overwrite, option="--output")

    torch_device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    loaded = None
    if policy is not None:
        # Presets are built for the model's labels; a file is bound to them (background/foreground groups fit any).
        loaded = policy_from_file_or_preset(policy, ckpt.dims, ckpt.label_names)
        if len(loaded.label_names) != ckpt.num_classes:
            raise PredictError(
                f"policy {policy} has {len(loaded.label_names)} labels {dict(loaded.label_names)} but the model in "
                f"{checkpoint} outputs {ckpt.num_classes} classes; use the policy learned with this model"
            )
        loaded.tea_selected(top_k)  # a bad --top-k fails here, before any output
    estimator = estimator_for_model(checkpoint, estimate, ckpt.label_names)
    postprocess = postprocess_from_options(min_component_mm3, keep_largest, ckpt.label_names)
    inputs = find_inputs(input_path, cases)
    check_inputs(inputs, ckpt.dims, ckpt.in_channels)
    model = ckpt.build_model().to(torch_device)
    output_dir = Path(output_dir)
    written: list[Path] = []
    rows: list[dict[str, Any]] = []
    quality: list[dict[str, Any]] = []
    bar = tqdm(inputs, desc="predict", unit="case", disable=None if progress is None else not progress)
    for case in bar:
        bar.set_postfix_str(case.case_id)
        prediction = predict_case(
            model, ckpt, case, loaded, top_k=top_k, batch_size=batch_size, device=torch_device, overlap=overlap,
            aggregate=aggregate, uncertainty=uncertainty, estimator=estimator,
        )
        if postprocess.active:
            spacing = prediction.header.get_zooms()[: prediction.labels.ndim]
            prediction.labels = apply_postprocess(prediction.labels, spacing, postprocess)
        written += write_case(prediction, output_dir, case.file_ending)
        if prediction.summary is not None:
            rows.append(prediction.summary)
            write_summary(rows, output_dir / UNCERTAINTY_DIR / UNCERTAINTY_CSV)
        if prediction.quality is not None:
            quality += prediction.quality
            write_summary(quality, output_dir / QUALITY_CSV)
    if rows:
        written.append(output_dir / UNCERTAINTY_DIR / UNCERTAINTY_CSV)
    if quality:
        written.append(output_dir / QUALITY_CSV)
    return written
