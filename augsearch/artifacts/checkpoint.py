"""Self-describing segmenter checkpoints: everything needed to resume a run or predict with it.

A checkpoint is one `torch.save`d dict, written atomically. Keys:
format, format_version, model (state_dict), model_config (UNet kwargs), config (ExperimentConfig dict), label_names,
preprocess (PreprocessConfig dict with the resolved target spacing and CT statistics), patch_size, epoch, step,
optimizers, policy (policy file dict or None), metrics, rng, data_fingerprint, versions.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from augsearch.artifacts.layout import CHECKPOINT_NAME
from augsearch.atomic import torch_save
from augsearch.errors import AugsearchError
from augsearch.model import UNet

CHECKPOINT_FORMAT = "augsearch-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(AugsearchError):
    """A checkpoint file that is missing, unreadable or not written by augsearch."""


def package_versions() -> dict[str, str]:
    import numpy

    import augsearch

    return {"augsearch": augsearch.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def rng_state() -> dict[str, Any]:
    """Global torch RNG state, saved so a resumed run draws what the uninterrupted run would have drawn."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    path: str | Path,
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
) -> Path:
    """Write the checkpoint atomically; returns its path."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": dict(model_config),
        "config": config,
        "label_names": dict(label_names),
        "preprocess": dict(preprocess),
        "patch_size": list(patch_size),
        "epoch": int(epoch),
        "step": int(step),
        "optimizers": optimizers,
        "policy": policy,
        "metrics": dict(metrics),
        "rng": {**rng_state(), **generators},
        "data_fingerprint": data_fingerprint,
        "versions": package_versions(),
    }
    path = Path(path)
    torch_save(payload, path)
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint (file or run directory)."""
    path = resolve_checkpoint_path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not an augsearch checkpoint: expected format {CHECKPOINT_FORMAT!r}, found {found!r}. "
            "For a model from another trainer, use the Python API augsearch.predict.tta.predict_tta(model, ...)"
        )
    if payload.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {payload['format_version']}, this augsearch reads "
            f"<= {CHECKPOINT_VERSION}; upgrade augsearch"
        )
    return payload


def build_model(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The segmenter described by a loaded checkpoint, with its weights, in eval mode."""

    model = UNet(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.eval()
