"""One trial of a search: the trial's config and one `fit`, shared by the Ray Tune trainable and the in-process runner.

Test hook: the environment variable AUGSEARCH_TEST_CRASH_ONCE=<marker file>, read by the driver when a search
starts, makes the first trial that reports a checkpoint create the marker and raise `SimulatedCrash`; every later
report sees the marker and carries on. Tests use it to check restart from the last checkpoint and `--resume`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.artifacts.layout import FIT_DIR
from augsearch.config import ExperimentConfig, apply_overrides, config_from_dict
from augsearch.data.synthetic import ensure_dataset
from augsearch.learn.server import PolicyServer
from augsearch.tune.space import SHARED_GROUP, SHARED_WORKER
from augsearch.train import fit

CRASH_ENV = "AUGSEARCH_TEST_CRASH_ONCE"


class SimulatedCrash(RuntimeError):
    """Raised once by the AUGSEARCH_TEST_CRASH_ONCE test hook."""


def prepare_data(cfg: ExperimentConfig) -> None:
    """Generate the synthetic benchmark once in the driver, so concurrent trials never race to write it."""

    ensure_dataset(cfg.data)


# Worker i of a shared search runs with seed base seed + WORKER_SEED_STRIDE * i: searches with neighbouring base seeds
# (the seeds of a table) share no worker seed.
WORKER_SEED_STRIDE = 1000


def trial_config(base: dict[str, Any], params: dict[str, Any], cpus: float) -> ExperimentConfig:
    """The trial's config: base + varied values, with torch threads set to the trial's CPUs.

    A worker of a shared search (params {"search.group": g, "search.worker": i, **the group's point}) runs with seed
    (the point's or the base) seed + WORKER_SEED_STRIDE * i.
    """
    overrides = {k: v for k, v in params.items() if k != SHARED_GROUP}
    overrides["train.num_threads"] = max(1, int(cpus))
    if SHARED_WORKER in params:
        seed = int(params.get("seed", base.get("seed", 0)))
        overrides["seed"] = seed + WORKER_SEED_STRIDE * int(params[SHARED_WORKER])
    return config_from_dict(apply_overrides(base, overrides), source="trial config")


def run_trial(
    *,
    trial_id: str,
    run_dir: Path,
    base: dict[str, Any],
    params: dict[str, Any],
    cpus: float,
    resume: Path | None,
    crash_marker: str | None,
    report: Callable[[dict[str, Any], Path | None, Path | None], None],
    policy_server: PolicyServer | None = None,
) -> None:
    """One fit of one trial: shared by the Ray trial function and the in-process runner.

    policy_server: the shared search's server (None for independent trials)."""
    started = time.time()
    import torch

    cfg = trial_config(base, params, cpus)
    # fit prints one line per epoch under the trial's name, with the policy summary
    cfg = cfg.model_copy(update={"name": f"{cfg.name}:{trial_id}"})
    torch.set_num_threads(max(1, int(cpus)))
    resumed_epoch = _checkpoint_epoch(resume) if resume is not None else 0
    node = _node_id()

    def on_epoch(rep) -> None:
        metrics = {k: float(v) for k, v in rep.metrics.items() if isinstance(v, (int, float))}
        metrics.update({"epoch": int(rep.epoch), "resumed_epoch": resumed_epoch, "node_id": node,
                        "time/trial_start": started, "time/report": time.time()})
        if cfg.search.metric not in metrics:
            return  # Tune reports carry the metric: only validation epochs are reported
        report(metrics, rep.checkpoint_path, rep.policy_path)
        if crash_marker and rep.checkpoint_path is not None and _claim(crash_marker):
            raise SimulatedCrash(f"{CRASH_ENV} test hook: trial {trial_id} crashes after epoch {rep.epoch}")

    # The trial's folder belongs to the search: a restart without a checkpoint starts it afresh. PBT continues
    # from a donor's checkpoint under the trial's own perturbed values, so only the data must match there.
    fit(cfg, run_dir / trial_id / FIT_DIR, callbacks=[on_epoch], resume=resume, policy_server=policy_server,
        overwrite=resume is None, check_config_on_resume=cfg.search.scheduler != "pbt")


def _checkpoint_epoch(path: Path) -> int:
    return load_checkpoint(path).epoch


def _claim(marker: str) -> bool:
    """Create the marker file; True only for the first caller across processes."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _node_id() -> str:
    ray = sys.modules.get("ray")  # loaded in Ray workers; the in-process runner never imports it
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return f"local:{socket.gethostname()}"
