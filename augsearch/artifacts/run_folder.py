"""A training run folder as one unit: refuse to overwrite it unasked, commit checkpoint and policy together,
and put it back in order after a crash (stale temp files, a lagging policy.json, metrics past the checkpoint).

Commit order: checkpoint.pt and policy.json are first written in full to temp files beside them, then policy.json is
renamed into place, then checkpoint.pt. A process killed between the two renames leaves policy.json one step
ahead of the checkpoint, never behind it; the checkpoint holds its own copy of the policy, and resuming writes that
copy back to policy.json (`restore_consistency`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from augsearch.artifacts.checkpoint import Checkpoint
from augsearch.artifacts.layout import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    POLICY_NAME,
    TENSORBOARD_DIR,
)
from augsearch.atomic import temp_beside, write_json, write_text
from augsearch.errors import AugsearchError

RUN_FILES = (CHECKPOINT_NAME, POLICY_NAME, METRICS_NAME, CONFIG_NAME, TENSORBOARD_DIR)


class RunFolderError(AugsearchError):
    """A run folder that holds another run, or one that cannot be resumed as asked."""


def stale_temp_files(run_dir: Path) -> list[Path]:
    """Temp files `atomic_open` leaves when a process is killed mid-write (`.<name>.<random>.tmp`)."""
    return sorted(p for p in run_dir.glob(".*.tmp") if p.is_file())


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a RUN_DIR that holds files unless resuming or told to overwrite; drop stale temp files.

    overwrite removes the files of the old run (checkpoint, policy, metrics, config, tb/) and nothing else.
    """
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite starts it afresh; pass one of them")
    if not run_dir.exists():
        return  # created by the first write
    if not run_dir.is_dir():
        raise RunFolderError(f"run directory {run_dir} is a file; pass --out with a directory path")
    for path in stale_temp_files(run_dir):
        path.unlink(missing_ok=True)
    if resume:
        return
    held = sorted(p.name for p in run_dir.iterdir())
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (" ..." if len(held) > 5 else "")
        raise RunFolderError(
            f"run directory {run_dir} already holds files ({shown}); pass --resume {run_dir} to continue that run, "
            f"--overwrite to start afresh (removes its {', '.join(RUN_FILES)}), or --out NEW_DIR"
        )
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def commit_step(run_dir: Path, checkpoint: dict[str, Any], policy: dict[str, Any] | None) -> None:
    """Write checkpoint.pt and policy.json (when there is a policy) as one step; see the module docstring."""
    import torch

    staged: list[tuple[Path, Path]] = []
    try:
        if policy is not None:
            text = json.dumps(policy, indent=2) + "\n"
            staged.append((_stage(run_dir / POLICY_NAME, lambda handle: handle.write(text.encode())),
                           run_dir / POLICY_NAME))
        staged.append((_stage(run_dir / CHECKPOINT_NAME, lambda handle: torch.save(checkpoint, handle)),
                       run_dir / CHECKPOINT_NAME))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, target in staged:
        os.replace(tmp, target)


def _stage(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """A complete, fsynced temp file beside PATH, named like `atomic_open`'s so a restart finds it if left."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def restore_consistency(run_dir: Path, ckpt: Checkpoint) -> None:
    """Before resuming RUN_DIR from CKPT: policy.json back to the checkpoint's policy, metrics.jsonl cut to its epoch.

    After a kill, policy.json may be a step ahead of the checkpoint and metrics.jsonl may hold epochs the
    checkpoint does not; the resumed run writes those epochs again.
    """
    if ckpt.policy is not None:
        policy_path = run_dir / POLICY_NAME
        try:
            current = json.loads(policy_path.read_text())
        except (OSError, ValueError):
            current = None
        if current != ckpt.policy:
            write_json(policy_path, ckpt.policy)
    metrics_path = run_dir / METRICS_NAME
    if metrics_path.is_file():
        kept = []
        for line in metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            if isinstance(record, dict) and int(record.get("epoch", 0)) <= ckpt.epoch:
                kept.append(line + "\n")
        write_text(metrics_path, "".join(kept))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resumable(ckpt: Checkpoint, config: dict[str, Any], config_hash: str, data_fingerprint: str, *,
                    anyway: bool, ignore_config: bool = False) -> None:
    """Refuse to resume CKPT under another config or dataset, naming both hashes and the keys that differ.

    anyway: the user's explicit override (--resume-anyway). ignore_config: only the data is checked (a PBT trial
    continues from a donor's checkpoint under its own perturbed values).
    """
    problems = []
    if not ignore_config and ckpt.config_hash != config_hash:
        stored, current = _flatten(ckpt.config), _flatten(config)
        changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
        shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
        problems.append(f"config hash {ckpt.config_hash[:12]} (checkpoint) != {config_hash[:12]} (this run); "
                        f"changed: {shown}")
    if ckpt.data_fingerprint != data_fingerprint:
        problems.append(f"data fingerprint {ckpt.data_fingerprint[:12]} (checkpoint) != {data_fingerprint[:12]} "
                        f"(this run's data.root)")
    if problems and not anyway:
        raise RunFolderError(
            f"cannot resume from {ckpt.path}: it was written by another run: " + "; ".join(problems)
            + ". Resume with the run's own config (config.json beside the checkpoint) and dataset, or pass "
            "--resume-anyway to continue under the new ones"
        )
