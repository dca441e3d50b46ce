"""Fit the Dice estimators on a run's validation cases and store them beside the model as `estimator.json`.

The validation cases are the ones the run validated on: the policy provenance's `val_cases` when the checkpoint holds
a policy, else the checkpoint's configured split resolved again on the dataset (which must have the checkpoint's
data fingerprint). Each case is predicted on its preprocessed grid exactly as `augsearch predict` would (same policy,
top-k, aggregation and spacing; a volume smaller than the window zero-padded to it), so the estimators are calibrated
on the probabilities they will later be applied to.

estimator.json: {"format": "augsearch-estimator", "version", "label_names", "default" (estimator used by predict),
"tta": {"policy", "top_k", "aggregate"}, "val_cases", "validation_dice" (true Dice per class, mean over cases),
"estimators": {name: {"name", "num_classes", "params"}}}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from augsearch.artifacts.checkpoint import load_checkpoint, resolve_checkpoint_path
from augsearch.artifacts.layout import ESTIMATOR_NAME
from augsearch.atomic import write_json
from augsearch.data.cases import load_cases
from augsearch.data.dataset import dataset_fingerprint, read_dataset_info
from augsearch.data.splits import resolve_splits
from augsearch.devices import resolve_device
from augsearch.policy.presets import policy_from_file_or_preset
from augsearch.predict.estimate import ESTIMATOR_VERSION, ESTIMATORS, Estimator, EstimatorError, fit_estimator
from augsearch.predict.tta import predict_tta

ESTIMATOR_FORMAT = "augsearch-estimator"
DEFAULT_ESTIMATOR = "CS-ATC"


def validation_case_ids(ckpt: dict[str, Any], info: Any) -> list[str]:
    """The run's validation case ids (policy provenance first, else the configured split on this dataset)."""
    provenance = (ckpt.policy or {}).get("provenance") or {}
    if provenance.get("val_cases"):
        return list(provenance["val_cases"])
    return list(resolve_splits(info, ckpt.experiment_config().data.split).val)


def fit_from_checkpoint(
    model_path: str | Path,
    *,
    dataset: str | Path | None = None,
    policy: str | Path | None = None,
    top_k: int | None = None,
    aggregate: Literal["probabilities", "logits"] = "probabilities",
    default: str = DEFAULT_ESTIMATOR,
    batch_size: int = 8,
    device: str | None = "auto",
    overwrite: bool = False,
) -> Path:
    """Fit every estimator on the run's validation cases and write `estimator.json` beside the checkpoint."""
    if default not in ESTIMATORS:
        raise EstimatorError(f"--default {default!r} is not an estimator; choose one of {', '.join(ESTIMATORS)}")
    ckpt_path = resolve_checkpoint_path(model_path)
    out = ckpt_path.parent / ESTIMATOR_NAME
    if out.exists() and not overwrite:
        raise EstimatorError(f"{out} exists; pass --overwrite to refit it")
    ckpt = load_checkpoint(ckpt_path)
    ids, probs, labels = validation_probabilities(ckpt, dataset=dataset, policy=policy, top_k=top_k,
                                                  aggregate=aggregate, batch_size=batch_size, device=device)
    document = {
        "format": ESTIMATOR_FORMAT,
        "version": ESTIMATOR_VERSION,
        "label_names": dict(ckpt.label_names),
        "default": default,
        "tta": {"policy": None if policy is None else str(policy), "top_k": top_k, "aggregate": aggregate},
        "val_cases": ids,
        "validation_dice": _mean_dice(probs, labels),
        "estimators": {name: fit_estimator(name, probs, labels).to_dict() for name in ESTIMATORS},
    }
    write_json(out, document)
    return out


def validation_probabilities(
    ckpt: dict[str, Any],
    *,
    dataset: str | Path | None = None,
    policy: str | Path | None = None,
    top_k: int | None = None,
    aggregate: Literal["probabilities", "logits"] = "probabilities",
    batch_size: int = 8,
    device: str | None = "auto",
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """The run's validation case ids, their predicted probabilities (K, *S) and labels (*S), preprocessed grid."""
    root = Path(dataset) if dataset is not None else Path(ckpt.experiment_config().data.root)
    info = read_dataset_info(root)
    if dataset_fingerprint(info) != ckpt.data_fingerprint:
        raise EstimatorError(f"dataset {root} is not the one the checkpoint was trained on (fingerprints differ); "
                             "pass --dataset with the training dataset")
    ids = validation_case_ids(ckpt, info)
    preprocess = ckpt.preprocess
    cases = load_cases(info, ids, preprocess, cache_dir=None)
    loaded = None if policy is None else policy_from_file_or_preset(policy, ckpt.dims,
                                                                    dict(ckpt.label_names))
    torch_device = resolve_device(device)
    model = ckpt.build_model().to(torch_device)
    probs = [
        predict_tta(model, case.image, loaded, spacing=case.spacing, top_k=top_k, window=ckpt.patch_size,
                    batch_size=batch_size, device=torch_device, aggregate=aggregate,
                    pad_to_window=True).probabilities.cpu().numpy().astype(np.float64)
        for case in cases
    ]
    return ids, probs, [np.asarray(case.label).astype(np.int64) for case in cases]


def _mean_dice(probs: list[np.ndarray], labels: list[np.ndarray]) -> list[float | None]:
    """True Dice per class of each case's argmax, averaged over the cases where it is defined (None: nowhere)."""
    per_case = []
    for p, y in zip(probs, labels):
        pred = p.argmax(0)
        per_case.append([_dice(pred == c, y == c) for c in range(p.shape[0])])
    means = np.nanmean(np.array(per_case, dtype=float), axis=0) if per_case else []
    return [None if math.isnan(v) else float(v) for v in means]


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    den = int(pred.sum() + gt.sum())
    return 2.0 * int((pred & gt).sum()) / den if den else math.nan


def load_estimators(path: str | Path) -> tuple[dict[str, Any], dict[str, Estimator]]:
    """The estimator.json document (a file or its model folder) and its fitted estimators by name."""
    path = Path(path)
    if path.is_dir():
        path = path / ESTIMATOR_NAME
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise EstimatorError(f"{path} does not exist; run `augsearch calibrate` on the model folder first") from None
    except json.JSONDecodeError as err:
        raise EstimatorError(f"{path} is not valid JSON ({err}); rerun `augsearch calibrate --overwrite`") from None
    if not isinstance(document, dict) or document.get("format") != ESTIMATOR_FORMAT:
        raise EstimatorError(f"{path} is not an augsearch estimator file (format {ESTIMATOR_FORMAT!r} expected)")
    if document.get("version", 0) > ESTIMATOR_VERSION:
        raise EstimatorError(f"{path} has version {document['version']}, this augsearch reads <= "
                             f"{ESTIMATOR_VERSION}; upgrade augsearch")
    return document, {name: Estimator.from_dict(entry) for name, entry in document["estimators"].items()}


def estimator_for_model(model_path: str | Path, name: str | None, label_names: dict[str, int]) -> Estimator | None:
    """The estimator `predict` applies: `name` (or the file's default) from the estimator.json beside the checkpoint.

    None when no name is asked and the model folder has no estimator.json. Raises EstimatorError for an asked name
    without a file, an unknown name, or a file fitted for other labels.
    """
    path = resolve_checkpoint_path(model_path).parent / ESTIMATOR_NAME
    if name is None and not path.is_file():
        return None
    document, estimators = load_estimators(path)
    chosen = name or document["default"]
    if chosen not in estimators:
        raise EstimatorError(f"--estimate {chosen!r} is not in {path}; it has {', '.join(estimators)}")
    if document["label_names"] != dict(label_names):
        raise EstimatorError(f"{path} was fitted for labels {document['label_names']}, the checkpoint has "
                             f"{dict(label_names)}; rerun `augsearch calibrate --overwrite`")
    return estimators[chosen]


def quality_rows(case_id: str, probs: np.ndarray, estimator: Estimator,
                 label_names: dict[str, int]) -> list[dict[str, Any]]:
    """quality.csv rows of one case: estimated Dice of each foreground class of argmax(probs (K, *S))."""
    dice = estimator.estimate(probs)
    return [
        {"case": case_id, "class": name, "value": value, "estimator": estimator.name,
         "estimated_dice": None if math.isnan(dice[value]) else float(dice[value])}
        for name, value in sorted(label_names.items(), key=lambda item: item[1]) if value != 0
    ]


def attach_estimates(rows: list[dict[str, Any]], quality_csv: str | Path) -> None:
    """Add estimated_dice and abs_error (|estimate - dice|) to evaluation rows {case, class, dice, ...} in place.

    A row's class matches a quality.csv row by label name or by label value; rows without an estimate get None.
    """
    import csv

    with open(quality_csv, newline="") as handle:
        table = list(csv.DictReader(handle))
    missing = {"case", "class", "value", "estimated_dice"} - set(table[0] if table else {})
    if missing:
        raise EstimatorError(f"{quality_csv} lacks columns {sorted(missing)}; it should come from `augsearch predict`")
    estimates = {}
    for entry in table:
        value = float(entry["estimated_dice"]) if entry["estimated_dice"] not in ("", "None") else math.nan
        estimates[(entry["case"], entry["class"])] = estimates[(entry["case"], entry["value"])] = value
    for row in rows:
        estimate = estimates.get((row["case"], str(row["class"])))
        row["estimated_dice"] = estimate
        row["abs_error"] = None if estimate is None else abs(estimate - row["dice"])
