"""Self-describing segmenter checkpoints: everything needed to resume a run or predict with it.

A checkpoint is one `torch.save`d dict of tensors and JSON-like primitives, written atomically and read back with
`torch.load(weights_only=True)`, so a crafted file can never run code. Keys:
format, format_version, model (state_dict), model_config (UNet kwargs), config (ExperimentConfig dict), label_names,
preprocess (PreprocessConfig dict with the resolved target spacing and CT statistics), patch_size, epoch, step,
optimizers, policy (policy file dict or None), metrics, rng, data_fingerprint, versions, context (context-label
settings or None: then model_config's num_classes is K + t and `build_model` merges the outputs back to K).
`load_checkpoint` returns a `Checkpoint`, the one place that knows these keys.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import platform
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.torch_version import TorchVersion

from augsearch.artifacts.layout import CHECKPOINT_NAME
from augsearch.atomic import torch_save
from augsearch.config import ExperimentConfig, PreprocessConfig, config_from_dict
from augsearch.context_labels import ContextLabelError, ContextMerged, ContextSpec
from augsearch.errors import AugsearchError, brief
from augsearch.model import UNet

CHECKPOINT_FORMAT = "augsearch-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(AugsearchError):
    """A checkpoint file that is missing, unreadable or not written by augsearch."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint. Tensors stay on the device given to `load_checkpoint`."""

    path: Path
    model_state: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    config: dict[str, Any]
    label_names: dict[str, int]
    preprocess_fields: dict[str, Any]
    patch_size: list[int]
    epoch: int
    step: int
    optimizers: dict[str, Any]
    policy: dict[str, Any] | None
    metrics: dict[str, Any]
    rng: dict[str, Any]
    data_fingerprint: str
    joint_state: dict[str, Any] | None = None
    context: dict[str, Any] | None = None

    @property
    def dims(self) -> int:
        return int(self.model_config["dims"])

    @property
    def num_classes(self) -> int:
        """K, the labels the model predicts (its head has K + t outputs with t context sub-classes)."""
        spec = self.context_spec()
        return spec.task_classes if spec is not None else int(self.model_config["num_classes"])

    def context_spec(self) -> ContextSpec | None:
        """The context-label settings the model was trained with, None without context labels."""
        if self.context is None:
            return None
        try:
            spec = ContextSpec.from_dict(self.context)
        except ContextLabelError as err:
            raise CheckpointError(f"{self.path}: {err}; use an earlier checkpoint or train again") from None
        if spec.total_classes != int(self.model_config["num_classes"]):
            raise CheckpointError(f"{self.path}: its context settings give K + t = {spec.total_classes} outputs, its "
                                  f"model has {self.model_config['num_classes']}; use an earlier checkpoint")
        return spec

    @property
    def in_channels(self) -> int:
        return int(self.model_config["in_channels"])

    @property
    def config_hash(self) -> str:
        """sha256 of the stored config, the same digest as `ExperimentConfig.fingerprint()` of the run's config."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()

    def experiment_config(self) -> ExperimentConfig:
        return config_from_dict(self.config, source=f"config stored in {self.path}")

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing the model was trained with (fields unknown to this version are dropped)."""
        known = PreprocessConfig.model_fields
        return PreprocessConfig.model_validate({k: v for k, v in self.preprocess_fields.items() if k in known})

    def build_model(self) -> torch.nn.Module:
        """The segmenter with its weights, in eval mode; with context labels, its K + t outputs merged to K."""
        spec = self.context_spec()
        try:
            model = UNet(**self.model_config)
            model.load_state_dict(self.model_state)
        except (TypeError, ValueError, RuntimeError) as err:  # a damaged model_config or weights that do not fit it
            raise CheckpointError(f"{self.path}: the checkpoint's model_config and weights do not fit together "
                                  f"({brief(str(err))}); use an earlier checkpoint or train again") from None
        return (model if spec is None else ContextMerged(model, spec)).eval()


def package_versions() -> dict[str, str]:
    import numpy

    import augsearch

    # str(): torch.__version__ is a str subclass that weights_only loading refuses
    return {"augsearch": str(augsearch.__version__), "torch": str(torch.__version__),
            "numpy": str(numpy.__version__), "python": platform.python_version()}


def rng_state() -> dict[str, Any]:
    """Global torch RNG state, saved so a resumed run draws what the uninterrupted run would have drawn."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(value: Any) -> Any:
    """Python scalars for numpy ones: `weights_only` loading accepts tensors and primitives only."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value


def checkpoint_payload(
    *,
    model: torch.nn.Module,
    model_config: dict[str, Any],
    config: dict[str, Any],
    label_names: dict[str, int],
    preprocess: dict[str, Any],
    patch_size: list[int],
    epoch: int,
    step: int,
    optimizers: dict[str, Any],
    policy: dict[str, Any] | None,
    metrics: dict[str, float],
    generators: dict[str, Any],
    data_fingerprint: str,
    joint_state: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict `save_checkpoint` writes; refuses non-finite weights, which no later run could use. joint_state: the
    joint step's own state (its running baselines), so a resumed search continues exactly. context: the context-label
    settings (`ContextSpec.to_dict()`) of a model with K + t outputs."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"the segmenter's weights are not finite ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); no "
            f"checkpoint written. Training diverged: lower train.lr or set train.grad_clip"
        )
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": state,
        "model_config": _plain(dict(model_config)),
        "config": _plain(config),
        "label_names": {str(k): int(v) for k, v in label_names.items()},
        "preprocess": _plain(dict(preprocess)),
        "patch_size": [int(p) for p in patch_size],
        "epoch": int(epoch),
        "step": int(step),
        "optimizers": _plain(optimizers),
        "policy": _plain(policy),
        "metrics": _plain(dict(metrics)),
        "rng": _plain({**rng_state(), **generators}),
        "data_fingerprint": data_fingerprint,
        "versions": package_versions(),
        "joint_state": _plain(joint_state),
        "context": _plain(context),
    }


def save_checkpoint(path: str | Path, **fields: Any) -> Path:
    """Write the checkpoint atomically (fields: those of `checkpoint_payload`); returns its path."""
    path = Path(path)
    torch_save(checkpoint_payload(**fields), path)
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint file or a run directory holding `checkpoint.pt`."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a checkpoint.pt written by `augsearch train` or its run directory"
        )
    return path


# What the readers of a checkpoint rely on: a file whose pickle was damaged in place fails here, not later.
FIELD_TYPES = {"model": dict, "model_config": dict, "label_names": dict, "preprocess": dict, "patch_size": list,
               "epoch": int, "step": int, "optimizers": dict, "rng": dict}


def _truncated(path: Path) -> bool:
    """Empty, or a torch zip archive (it starts with the zip magic) cut before its end record."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return not head or (head == b"PK\x03\x04" and not zipfile.is_zipfile(path))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint (file or run directory). Never unpickles anything but tensors and plain data."""
    path = resolve_checkpoint_path(path)
    try:
        # Checkpoints of earlier versions carry torch.__version__, a str subclass: allowed, it runs no code.
        with torch.serialization.safe_globals([TorchVersion]):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line.split("error:", 1)[-1].strip() for line in str(err).splitlines()
                      if "WeightsUnpickler error" in line), "objects other than tensors and plain data")
        raise CheckpointError(
            f"{path} was refused: a checkpoint may hold only tensors and plain data, this one holds Python objects "
            f"that loading could run as code ({found.split(' was not')[0]}). Load only checkpoints written by "
            f"augsearch train"
        ) from None
    except Exception as err:  # torch raises many types for corrupt or foreign files
        if _truncated(path):
            raise CheckpointError(
                f"{path} is truncated ({path.stat().st_size} bytes, its zip archive has no end record): the write "
                "was cut short; use an earlier checkpoint or write it again"
            ) from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {brief(str(err))})"
                              ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not an augsearch checkpoint: expected format {CHECKPOINT_FORMAT!r}, found {found!r}. "
            "For a model from another trainer, use the Python API augsearch.predict.tta.predict_tta(model, ...)"
        )
    version = payload.get("format_version", 0)
    if type(version) is not int or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {brief(version)}, this augsearch reads "
            f"<= {CHECKPOINT_VERSION}; upgrade augsearch"
        )
    damaged = [key for key, kind in FIELD_TYPES.items() if not isinstance(payload.get(key), kind)]
    if not damaged and not all(isinstance(v, torch.Tensor) for v in payload["model"].values()):
        damaged = ["model"]
    if damaged:
        raise CheckpointError(f"{path} is damaged: {', '.join(damaged)} missing or of the wrong type; use an "
                              "earlier checkpoint or train again")
    try:
        return Checkpoint(
            path=path, model_state=payload["model"], model_config=dict(payload["model_config"]),
            config=payload["config"], label_names={str(k): int(v) for k, v in payload["label_names"].items()},
            preprocess_fields=dict(payload["preprocess"]), patch_size=[int(p) for p in payload["patch_size"]],
            epoch=int(payload["epoch"]), step=int(payload["step"]), optimizers=payload.get("optimizers") or {},
            policy=payload.get("policy"), metrics=payload.get("metrics") or {}, rng=payload.get("rng") or {},
            data_fingerprint=str(payload.get("data_fingerprint", "")), joint_state=payload.get("joint_state"),
            context=payload.get("context"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is an incomplete augsearch checkpoint ({type(err).__name__}: {err}); "
                              f"write it again with augsearch train") from None
