"""Policy files: versioned JSON that carries everything needed to re-apply a policy without the code that made it.

A file states its dims, the axis and intensity conventions, each op's spec (bins with magnitude bands and signs),
the class groups by label name and value, per group and op the probabilities and logits, the sampling kind, the TEA
pool with its probabilities, logits and selected top-K, and provenance. `policies/README.md` describes every field.
Loading validates the structure (pydantic models below; `policy_json_schema` is generated from them), then the
meaning: known ops with the registry's bins, probabilities that sum to one, the registry's TEA pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from augsearch.atomic import write_json
from augsearch.errors import AugsearchError, PolicyFileError, brief
from augsearch.ops.registry import FLIPS, INTENSITY_ORDER, ROTATIONS, get_op, list_ops
from augsearch.ops.tea import tea_pool
from augsearch.policy.core import Policy, PolicyError
from augsearch.textfiles import MalformedText, parse_json, read_text

FORMAT = "augsearch-policy"


SCHEMA_VERSION = 1


AXES = "torch dims 2.. = x, y, z of the NIfTI voxel grid"


INTENSITY_SPACE = "zscore"


SIGN_CONVENTION = (
    "sign +1 / -1: the bin's direction (positive / negative angle, factor above 1 / its reciprocal, shift up / down, "
    "as each op's description says); 0: a bin without a direction. Magnitudes are drawn uniformly from [low, high]."
)


LABEL_INTERPOLATION = "nearest"


IMAGE_INTERPOLATION = "linear"


AGGREGATION = "mean_probabilities"


PROB_TOLERANCE = 1e-4




# File model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BinModel(_Strict):
    """One bin of an op: magnitudes uniform in [low, high], with a direction `sign`."""

    label: str
    low: float
    high: float
    sign: Literal[-1, 0, 1]


class OpModel(_Strict):
    """One TRA op: its registry spec and its categorical per class group."""

    name: str = Field(description="Registry op name, e.g. 'rotate_xy'.")
    kind: Literal["spatial", "intensity"]
    bins: list[BinModel] = Field(min_length=1, description="Bin 0 is 'off' (identity).")
    available: list[bool] = Field(description="Per bin; unavailable bins have probability 0 and are never drawn.")
    probs: dict[str, list[float]] = Field(description="Group name -> probability per bin (sums to 1).")
    logits: dict[str, list[float]] = Field(description="Group name -> logit per bin (softmax over available bins).")


class GroupModel(_Strict):
    """A class group: patches anchored on these labels use its TRA categoricals."""

    name: str
    labels: list[str] = Field(description="Label names.")
    values: list[int] = Field(description="Label values, in the order of `labels`.")


class RandAugmentModel(_Strict):
    n: int = Field(ge=1, description="Ops per sample.")
    m: int = Field(ge=1, description="Magnitude level (1 = weakest band of each op).")


class TraModel(_Strict):
    sampling: Literal["independent", "randaugment", "trivialaugment", "none"]
    randaugment: RandAugmentModel | None = Field(description="n and m when sampling is 'randaugment', else null.")
    temperature: float = Field(gt=0, description="Gumbel-softmax temperature of the straight-through weights.")
    ops: list[OpModel] = Field(min_length=1, description="Ops in logit order.")


class TeaEntryModel(_Strict):
    id: int = Field(ge=0, description="Position in the pool; 0 is the identity.")
    name: str
    op: str
    value: float | None
    spatial: bool = Field(description="Spatial entries are inverted on the predictions before aggregation.")


class SelectedModel(_Strict):
    id: int = Field(ge=0)
    name: str
    weight: float = Field(ge=0, le=1)


class TeaModel(_Strict):
    pool: list[TeaEntryModel] = Field(min_length=1)
    available: list[bool]
    probs: list[float]
    logits: list[float]
    top_k: int = Field(ge=1)
    selected: list[SelectedModel] = Field(description="Top-K entries by probability, weights renormalised to 1.")
    aggregation: Literal["mean_probabilities"] = Field(
        description="Weighted mean of the inverted softmax probabilities of the selected views."
    )


class ConventionsModel(_Strict):
    axes: Literal["torch dims 2.. = x, y, z of the NIfTI voxel grid"]
    intensity_space: Literal["zscore"]
    sign: str
    image_interpolation: Literal["linear"]
    label_interpolation: Literal["nearest"]
    op_order: list[str] = Field(
        description="Stages in the order they are applied: one affine warp (scale and rotation angles), rot90, "
        "intensity ops, flips. Informational: the pipeline of the reading augsearch applies its own order."
    )


class PolicyFileModel(_Strict):
    """An augsearch policy file."""

    model_config = ConfigDict(extra="forbid", strict=True, title="augsearch policy file")

    format: Literal["augsearch-policy"]
    schema_version: int = Field(ge=1)
    dims: int = Field(description="2 or 3.")
    conventions: ConventionsModel
    label_names: dict[str, int] = Field(description="Label name -> value, as in dataset.json.")
    groups: list[GroupModel] = Field(min_length=1)
    tra: TraModel
    tea: TeaModel
    provenance: dict[str, Any] = Field(description="Free-form: how the policy was made (run, config, metrics).")


def policy_json_schema() -> dict:
    """JSON Schema of policy files (policies/schema.json is this, generated)."""
    schema = PolicyFileModel.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# Migrations: MIGRATIONS[v] turns a version-v document into a version-(v + 1) document.

MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def migrate(data: dict, source: str) -> dict:
    """Bring a document of an older schema_version up to SCHEMA_VERSION."""
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PolicyFileError(f"{source}: schema_version must be an integer, got {brief(version)}.")
    if version > SCHEMA_VERSION:
        raise PolicyFileError(
            f"{source}: schema_version {version} is newer than this augsearch reads (version <= {SCHEMA_VERSION}); "
            "upgrade the augsearch package."
        )
    while version < SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise PolicyFileError(
                f"{source}: schema_version {version} has no migration to {SCHEMA_VERSION} (known versions "
                f"{sorted(MIGRATIONS) + [SCHEMA_VERSION]}); rewrite the file in version {SCHEMA_VERSION}."
            )
        data = MIGRATIONS[version](dict(data))
        version += 1
        data["schema_version"] = version
    return data


# Policy -> document


def op_order(op_names: Sequence[str]) -> list[str]:
    """Application stages of the ops in `op_names` (augsearch.ops.registry.apply_params)."""

    present = set(op_names)
    affine = [name for name in ("scale", *ROTATIONS) if name in present]
    rot90 = [name for name in ROTATIONS if name in present]
    stages = [f"affine: {', '.join(affine)}"] if affine else []
    stages += [f"rot90: {', '.join(rot90)}"] if rot90 else []
    stages += [name for name in (*INTENSITY_ORDER, *FLIPS) if name in present]
    return stages


def _floats(t: torch.Tensor) -> list[float]:
    """float32 values as Python floats: exact, so logits survive a JSON round trip bit for bit."""
    return [float(v) for v in t.detach().cpu().to(torch.float32).tolist()]


def policy_to_dict(policy: Policy, provenance: Mapping[str, Any] | None = None) -> dict:
    """The policy file document (JSON-able) of `policy`."""
    probs = policy.tra_probs().detach().cpu()
    logits = policy.tra_logits.detach().cpu()
    ops = []
    for k, spec in enumerate(policy.op_specs):
        n = len(spec.bins)
        ops.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "bins": [
                    {"label": b.label, "low": float(b.low), "high": float(b.high), "sign": int(b.sign)}
                    for b in spec.bins
                ],
                "available": [bool(a) for a in policy.available[k, :n].tolist()],
                "probs": {g: _floats(probs[i, k, :n]) for i, g in enumerate(policy.group_names)},
                "logits": {g: _floats(logits[i, k, :n]) for i, g in enumerate(policy.group_names)},
            }
        )
    names = policy.group_label_names()
    tea_probs = policy.tea_probs().detach().cpu()
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "dims": policy.dims,
        "conventions": {
            "axes": AXES,
            "intensity_space": INTENSITY_SPACE,
            "sign": SIGN_CONVENTION,
            "image_interpolation": IMAGE_INTERPOLATION,
            "label_interpolation": LABEL_INTERPOLATION,
            "op_order": op_order(policy.op_names),
        },
        "label_names": dict(policy.label_names),
        "groups": [
            {"name": g, "labels": list(names[g]), "values": list(policy.group_labels[g])} for g in policy.group_names
        ],
        "tra": {
            "sampling": policy.sampling,
            "randaugment": (
                {"n": policy.randaugment_n, "m": policy.randaugment_m} if policy.sampling == "randaugment" else None
            ),
            "temperature": policy.tau,
            "ops": ops,
        },
        "tea": {
            "pool": [
                {
                    "id": int(e.id),
                    "name": e.name,
                    "op": e.op,
                    "value": None if e.value is None else float(e.value),
                    "spatial": bool(e.spatial),
                }
                for e in policy.tea_entries
            ],
            "available": [bool(a) for a in policy.tea_available.tolist()],
            "probs": _floats(tea_probs),
            "logits": _floats(policy.tea_logits),
            "top_k": policy.tea_top_k,
            "selected": [
                {"id": i, "name": policy.tea_entries[i].name, "weight": w} for i, w in policy.tea_selected()
            ],
            "aggregation": AGGREGATION,
        },
        "provenance": dict(provenance or {}),
    }


def save_policy(policy: Policy, path: str | Path, provenance: Mapping[str, Any] | None = None) -> None:
    """Write `policy` as a policy file, atomically."""

    write_json(path, policy_to_dict(policy, provenance))


# Document -> Policy


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _structure_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        where = _loc(e["loc"])
        if e["type"] == "missing":
            lines.append(f"missing field '{where}'")
        elif e["type"] == "extra_forbidden":
            lines.append(f"unknown field '{where}' (remove it; see policies/schema.json)")
        else:
            lines.append(f"field '{where}': {e['msg']}, got {brief(e.get('input'))}")
    return lines


def _registry():

    return get_op, list_ops, tea_pool


def _bins_equal(a, b) -> bool:
    return (
        a.label == b.label
        and math.isclose(float(a.low), float(b.low), rel_tol=1e-9, abs_tol=1e-12)
        and math.isclose(float(a.high), float(b.high), rel_tol=1e-9, abs_tol=1e-12)
        and int(a.sign) == int(b.sign)
    )


def _check_categorical(
    problems: list[str], where: str, probs: list[float], logits: list[float], available: list[bool]
) -> None:
    """Probabilities sum to one, are 0 where unavailable, and equal softmax(logits) over the available entries."""
    n = len(available)
    if len(probs) != n or len(logits) != n:
        problems.append(f"{where}: probs has {len(probs)} and logits {len(logits)} values, expected {n} (one per bin)")
        return
    if any(not math.isfinite(v) for v in probs + logits):
        problems.append(f"{where}: probs and logits must be finite numbers")
        return
    total = sum(probs)
    if abs(total - 1.0) > PROB_TOLERANCE or min(probs) < 0:
        problems.append(
            f"{where}: probabilities sum to {total:.6g}, expected 1 (tolerance {PROB_TOLERANCE:g}) with none "
            "negative; fix probs and logits together (logits = log(probs))"
        )
        return
    blocked = [i for i in range(n) if not available[i] and probs[i] > PROB_TOLERANCE]
    if blocked:
        problems.append(f"{where}: unavailable bins {blocked} have non-zero probability; set them to 0")
        return
    masked = torch.tensor(logits, dtype=torch.float64).masked_fill(~torch.tensor(available), -math.inf)
    expected = torch.softmax(masked, 0)
    gap = float((expected - torch.tensor(probs, dtype=torch.float64)).abs().max())
    if gap > PROB_TOLERANCE:
        problems.append(
            f"{where}: probs differ from softmax(logits) by up to {gap:.3g}; the logits are authoritative: write "
            "probs = softmax(logits), or logits = log(probs)"
        )


def policy_from_dict(data: Any, source: str = "<policy document>") -> Policy:
    """Validate a policy document (structure, then meaning against the op registry) and build the Policy."""
    if not isinstance(data, dict):
        raise PolicyFileError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}.")
    if data.get("format") != FORMAT:
        raise PolicyFileError(
            f"{source}: 'format' must be {FORMAT!r}, got {brief(data.get('format'))}; "
            "this is not an augsearch policy file."
        )
    if "schema_version" not in data:
        raise PolicyFileError(f"{source}: missing field 'schema_version' (this augsearch writes {SCHEMA_VERSION}).")
    data = migrate(data, source)
    try:
        doc = PolicyFileModel.model_validate(data)
    except ValidationError as err:
        raise PolicyFileError(f"{source}: " + "; ".join(_structure_errors(err)) + ".") from None

    if doc.dims not in (2, 3):
        raise PolicyFileError(f"{source}: dims must be 2 or 3, got {doc.dims}.")
    get_op, list_ops, tea_pool = _registry()
    valid = list_ops(doc.dims)
    problems: list[str] = []

    labels = doc.label_names
    group_names = [g.name for g in doc.groups]
    if len(set(group_names)) != len(group_names):
        problems.append(f"groups: names must be unique, got {group_names}")
    group_labels: dict[str, list[int]] = {}
    for g in doc.groups:
        if len(g.labels) != len(g.values):
            problems.append(f"groups.{g.name}: {len(g.labels)} labels but {len(g.values)} values")
            continue
        for name, value in zip(g.labels, g.values):
            if labels.get(name) != value:
                problems.append(
                    f"groups.{g.name}: label {brief(name)} has value {brief(labels.get(name))} in label_names, "
                    f"not {value}"
                )
        group_labels[g.name] = list(g.values)

    specs = []
    seen: set[str] = set()
    for k, op in enumerate(doc.tra.ops):
        where = f"tra.ops[{k}] ({op.name})"
        if op.name in seen:
            problems.append(f"{where}: op listed twice")
            continue
        seen.add(op.name)
        try:
            spec = get_op(op.name).spec
        except AugsearchError:
            problems.append(f"{where}: unknown op {brief(op.name)}; valid ops in {doc.dims}D: {', '.join(valid)}")
            continue
        if op.name not in valid:
            problems.append(f"{where}: op {brief(op.name)} is not available in {doc.dims}D (it works in {spec.dims}D)")
            continue
        if op.kind != spec.kind:
            problems.append(f"{where}: kind {brief(op.kind)}, but the registry says {brief(spec.kind)}")
        if len(op.bins) != len(spec.bins) or not all(_bins_equal(a, b) for a, b in zip(op.bins, spec.bins)):
            ours = [(b.label, b.low, b.high, b.sign) for b in spec.bins]
            problems.append(
                f"{where}: bins differ from this augsearch's registry; expected {ours}, got "
                f"{[(b.label, b.low, b.high, b.sign) for b in op.bins]}. The policy was made with other op "
                "definitions: re-learn it, or use the augsearch version named in its provenance"
            )
            continue
        if len(op.available) != len(spec.bins) or not op.available[0]:
            problems.append(f"{where}: available needs one flag per bin ({len(spec.bins)}) with bin 0 available")
            continue
        if set(op.probs) != set(group_names) or set(op.logits) != set(group_names):
            problems.append(
                f"{where}: probs and logits need one entry per group {group_names}, got {sorted(op.probs)} and "
                f"{sorted(op.logits)}"
            )
            continue
        for g in group_names:
            _check_categorical(problems, f"{where} group {brief(g)}", op.probs[g], op.logits[g], op.available)
        specs.append(spec)

    tea = doc.tea
    pool = tea_pool(doc.dims)
    if len(tea.pool) != len(pool) or any(
        (e.id, e.name, e.op, e.spatial) != (p.id, p.name, p.op, p.spatial)
        or (e.value is None) != (p.value is None)
        or (e.value is not None and not math.isclose(e.value, float(p.value), rel_tol=1e-9, abs_tol=1e-12))
        for e, p in zip(tea.pool, pool)
    ):
        problems.append(
            f"tea.pool: differs from this augsearch's {doc.dims}D TEA pool ({len(pool)} entries, "
            f"got {len(tea.pool)}); the policy was made with another pool: re-learn it"
        )
    elif len(tea.available) != len(pool) or not tea.available[0]:
        problems.append(f"tea.available: needs one flag per pool entry ({len(pool)}) with the identity available")
    else:
        _check_categorical(problems, "tea", tea.probs, tea.logits, tea.available)

    if problems:
        raise PolicyFileError(f"{source}: " + "; ".join(problems) + ".")

    n_ops, max_bins = len(specs), max(len(s.bins) for s in specs)
    tra_logits = torch.zeros(len(group_names), n_ops, max_bins)
    available = torch.zeros(n_ops, max_bins, dtype=torch.bool)
    for k, op in enumerate(doc.tra.ops):
        n = len(op.bins)
        available[k, :n] = torch.tensor(op.available)
        for i, g in enumerate(group_names):
            tra_logits[i, k, :n] = torch.tensor(op.logits[g], dtype=torch.float32)
    try:
        policy = Policy(
            dims=doc.dims,
            op_specs=specs,
            group_labels=group_labels,
            label_names=labels,
            tea_entries=pool,
            tra_logits=tra_logits,
            tea_logits=torch.tensor(tea.logits, dtype=torch.float32),
            available=available,
            tea_available=torch.tensor(tea.available),
            sampling=doc.tra.sampling,
            randaugment_n=doc.tra.randaugment.n if doc.tra.randaugment else 2,
            randaugment_m=doc.tra.randaugment.m if doc.tra.randaugment else 2,
            tea_top_k=tea.top_k,
            tau=doc.tra.temperature,
        )
    except PolicyError as err:
        raise PolicyFileError(f"{source}: {err}") from None
    if doc.tra.sampling == "randaugment" and doc.tra.randaugment is None:
        raise PolicyFileError(f"{source}: tra.randaugment must give n and m when sampling is 'randaugment'.")
    expected = [i for i, _ in policy.tea_selected()]
    if [s.id for s in tea.selected] != expected:
        raise PolicyFileError(
            f"{source}: tea.selected lists ids {[s.id for s in tea.selected]}, but the top {tea.top_k} of tea.probs "
            f"are {expected}; selected is derived from probs: write it again (save_policy does)."
        )
    return policy


def read_policy_document(path: str | Path) -> dict:
    """The parsed JSON of a policy file, with clear errors for a missing file or malformed JSON."""
    path = Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise PolicyFileError(f"no policy file at {path}; give an existing .json file or a preset name.") from None
    except IsADirectoryError:
        raise PolicyFileError(f"{path} is a directory; give a policy .json file.") from None
    except MalformedText as err:
        raise PolicyFileError(f"{path}: {err}.") from None
    try:
        return parse_json(text)
    except MalformedText as err:
        raise PolicyFileError(f"{path}: {err}; fix the syntax there.") from None


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file."""
    return policy_from_dict(read_policy_document(path), source=str(path))
