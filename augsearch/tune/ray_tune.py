"""Searches on Ray Tune: the Ray session (local loopback or a cluster by address), the trainable, the scheduler.

The only module that imports ray.tune, and only inside the functions that need it, so `--no-ray` searches run where
Ray is missing. Trials resume from their last checkpoint after a worker failure (Ray restarts the trial,
`tune.get_checkpoint()` hands back the last reported checkpoint, `fit(resume=...)` continues from its epoch); PBT's
exploit step is the same mechanism with the donor's checkpoint, and the trial re-reads its (perturbed) parameters
each time it starts.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from augsearch.artifacts.layout import (
    CHECKPOINT_NAME,
    FIT_DIR,
    MANIFEST_NAME,
    POLICY_NAME,
)
from augsearch.config import ExperimentConfig, config_from_dict
from augsearch.errors import SearchError
from augsearch.learn.server import RayPolicyServer, actor_name, start_ray_server
from augsearch.tune.reaper import Reaper, one_ends_within, running_children
from augsearch.tune.space import SHARED_GROUP, shared_members, trial_params
from augsearch.tune.summary import (
    SearchResult,
    finish_search,
    finished_status,
    trial_row,
)
from augsearch.tune.trial import CRASH_ENV, run_trial, trial_config

CONNECT_TIMEOUT_S = 5.0
# The one Tune config key of a shared search: a grid over its members ({"search.group", "search.worker", **point}).
SHARED_MEMBER = "search.member"


def _tune_space(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            out[key] = tune.grid_search(spec)
            continue
        (kind, args), = spec.items()
        out[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return out


def ray_trial(params: dict[str, Any], *, setup: dict[str, Any]) -> None:
    """Ray Tune function trainable: one fit, a report with checkpoint at every validation."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(setup["run_dir"])
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        # A private copy: Ray may delete old checkpoint dirs (num_to_keep) while fit still reads this one.
        restore_dir = run_dir / trial_id / FIT_DIR / "restore"
        shutil.rmtree(restore_dir, ignore_errors=True)
        checkpoint.to_directory(str(restore_dir))
        resume = restore_dir / CHECKPOINT_NAME

    def report(metrics: dict[str, Any], checkpoint_path: Path | None, policy_path: Path | None) -> None:
        if checkpoint_path is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="augsearch-ckpt-") as tmp:
            shutil.copy2(checkpoint_path, Path(tmp) / CHECKPOINT_NAME)
            if policy_path is not None and Path(policy_path).is_file():
                shutil.copy2(policy_path, Path(tmp) / POLICY_NAME)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    params = params.get(SHARED_MEMBER, params)
    server = None
    if "policy_servers" in setup:  # a worker of a shared search: its group's server
        server = RayPolicyServer(setup["policy_servers"][params.get(SHARED_GROUP, 0)])
    run_trial(trial_id=trial_id, run_dir=run_dir, base=setup["base"], params=params, cpus=setup["cpus"],
                resume=resume, crash_marker=setup.get("crash_marker"), report=report, policy_server=server)


def trial_dirname(trial: Any) -> str:
    """Ray trial directories are named by trial id, like the in-process runner's."""
    return str(trial.trial_id)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> bool | None:
    """Fail fast with a SearchError when ADDR (host:port or ray://host:port) does not accept connections, or when
    a host:port that does is not a Ray head (its GCS does not answer within `timeout`): `ray.init` would hang.

    Returns whether the head's GCS asks for Ray's auth token; None for `auto` and ray:// addresses (not asked)."""
    if address == "auto":
        return None
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise SearchError(f"--address {address!r} is not host:port; pass the head's address, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise SearchError(
            f"cannot reach a Ray cluster at {address} within {timeout:.0f} s ({err}); start the head with "
            f"workers/start_head.sh and pass the address it prints, or drop --address for a local Ray"
        ) from None
    return None if "://" in address else _check_gcs(address, timeout)


def _check_gcs(address: str, timeout: float) -> bool:
    """Ask the GCS at ADDRESS for its cluster id, without a token: True when it refuses for want of Ray's auth token,
    False when it answers; anything else means the port is something else."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise SearchError(
                f"{address} accepts connections but is not the head of a Ray cluster (no answer from a Ray GCS "
                f"within {timeout:.0f} s: {err.code().name}); pass the address that `ray start --head` or "
                f"workers/start_head.sh prints (its GCS port, 6379 by default)"
            ) from None
    return False


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join ADDRESS, or start a local loopback-only Ray with this machine's resources and stop it afterwards.

    An already initialised Ray (a test fixture, a notebook) is used as it is and left running. For a local start or
    a loopback address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before ray is imported: it keeps every Ray server
    and connection on 127.0.0.1 (Ray reads it once, at import).
    """
    host = address.split("://", 1)[-1].rpartition(":")[0] if address else "127.0.0.1"
    if _is_loopback(host) and "ray" not in sys.modules:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # keep every trial's epoch lines
    needs_token = check_reachable(address) if address else None
    import ray

    if ray.is_initialized():
        yield
        return
    # Ray installs its own SIGTERM handler (a bare exit); keep ours, which stops a search like Ctrl-C
    sigterm = signal.getsignal(signal.SIGTERM)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    reaper, auth_mode = None, _UNSET
    if address:
        kwargs["address"] = address
        if _is_loopback(host):
            kwargs["_node_ip_address"] = "127.0.0.1"
        if needs_token is not None:
            # The driver's own servers follow the head's answer, not the token file: a driver that asks for a token
            # the cluster never sends refuses the GCS's calls, and the GCS, taking it for dead, cancels every actor
            # it owns (the trials) as soon as they are registered
            auth_mode = _use_auth_mode("token" if needs_token else "disabled")
        elif (Path.home() / ".ray" / "auth_token").is_file() or os.environ.get("RAY_AUTH_TOKEN"):
            # not asked (ray://, auto): `ray start` turns token authentication on when a token exists
            os.environ.setdefault("RAY_AUTH_MODE", "token")
    else:
        # address="local": always a private Ray, never RAY_ADDRESS or another cluster registered on this machine;
        # the reaper ends it should this process be killed before it can
        kwargs.update(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1")
        reaper = Reaper()
    try:
        ray.init(**kwargs)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
        yield
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.done()
        if auth_mode is not _UNSET:
            _use_auth_mode(auth_mode)


_UNSET = object()


def _use_auth_mode(mode: str | None) -> str | None:
    """Sets RAY_AUTH_MODE (None: unsets it) for this process; returns its previous value.

    Ray caches its config, auth mode included, from the first time it reads it in a process (an earlier local
    `ray.init` turns token mode on and keeps it); refreshing it here is how Ray itself switches the mode.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    previous = os.environ.pop("RAY_AUTH_MODE", None)
    if mode is not None:
        os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return previous


def check_resources(cpus: float, gpus: float, together: int = 1) -> None:
    """SearchError when no alive node can hold one trial, or the cluster cannot hold `together` trials at once (the
    workers of a shared search), before anything is launched or written."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    most_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    total = ray.cluster_resources()
    if gpus > most_gpus:
        raise SearchError(
            f"each trial asks for {gpus:g} GPUs (search.gpus_per_trial / --gpus-per-trial), but the largest node "
            f"has {most_gpus:g} (cluster total {total.get('GPU', 0.0):g}); lower --gpus-per-trial (fractions like "
            f"0.5 share a GPU) or add GPU workers"
        )
    if cpus > most_cpus:
        raise SearchError(
            f"each trial asks for {cpus:g} CPUs (search.cpus_per_trial / --cpus-per-trial), but the largest node "
            f"has {most_cpus:g}; lower --cpus-per-trial"
        )
    slots = sum(min(_times(n.get("CPU", 0.0), cpus), _times(n.get("GPU", 0.0), gpus)) for n in nodes)
    if slots < together:
        raise SearchError(
            f"search.num_workers={together} workers of a shared search run at once (each policy round waits for "
            f"every one of them), but this cluster holds {slots} trials of {cpus:g} CPUs and {gpus:g} GPUs at a time; "
            f"lower search.cpus_per_trial (fractions like 0.5 share a CPU), search.gpus_per_trial or "
            f"search.num_workers, or add nodes"
        )


def _times(available: float, each: float) -> float:
    """How many requests of `each` fit in `available` (any number when nothing is asked)."""
    return math.floor(available / each + 1e-9) if each > 0 else math.inf


def run_ray(run_dir: Path, manifest: dict[str, Any], *, restore: bool) -> SearchResult:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    cfg = config_from_dict(manifest["config"], source=str(run_dir / MANIFEST_NAME))
    search = cfg.search
    setup = {"run_dir": str(run_dir), "base": manifest["config"], "cpus": search.cpus_per_trial,
             "crash_marker": os.environ.get(CRASH_ENV)}
    space, concurrent, servers = _tune_space(search.space), search.max_concurrent_trials, []
    if search.policy_sharing == "shared":
        # the workers are the trials, one group of them per point of the space; the driver owns the groups' server
        # actors, so they live exactly as long as the search
        members = shared_members(search.space, search.num_workers)
        for group in range(len(members) // search.num_workers):
            group_cfg = trial_config(manifest["config"], members[group * search.num_workers], search.cpus_per_trial)
            servers.append(start_ray_server(run_dir, group, group_cfg.augment, group_cfg.train, search.num_workers,
                                            search.sync_timeout_s))
        setup["policy_servers"] = [actor_name(run_dir, group) for group in range(len(servers))]
        # one grid key keeps Tune's trial order group by group
        space = {SHARED_MEMBER: tune.grid_search(members)}
        # whole groups at once: a round waits for every worker of its group
        concurrent = search.num_workers * max(1, (concurrent or search.num_workers) // search.num_workers)
    resources = {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(ray_trial, setup=setup), resources)
    if restore:
        tuner = tune.Tuner.restore(str(run_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                scheduler=_scheduler(cfg), trial_dirname_creator=trial_dirname,
                # Tune ignores TuneConfig.max_concurrent_trials when given a variant generator: the limit goes here
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent or 0),
            ),
            run_config=tune.RunConfig(
                name=run_dir.name, storage_path=str(run_dir.parent),
                failure_config=tune.FailureConfig(max_failures=search.max_failures),
                # PBT copies a donor's checkpoint that may be several reports old: keep them all for PBT
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if search.scheduler == "pbt" else 2),
            ),
        )
    with _tune_stop_events() as stop_events:
        grid = tuner.fit()
    del servers  # the actors end with the search (their state files stay for --resume)
    rows = [_ray_row(result, run_dir, cfg) for result in grid]
    rows.sort(key=lambda row: row["trial"])
    expected = len(trial_params(search, cfg.seed))
    interrupted = any(event.is_set() for event in stop_events) or len(grid) < expected
    return finish_search(run_dir, rows, cfg, interrupted=interrupted)


@contextlib.contextmanager
def _tune_stop_events() -> Iterator[list[threading.Event]]:
    """The events Tune sets when Ctrl-C (SIGINT) stops `Tuner.fit`, one per fit.

    On Ctrl-C Tune saves its state, stops every trial (their status then reads TERMINATED, like finished ones) and
    returns normally; the only record of the interruption is the event its signal handler sets, which Tune keeps to
    itself. This wraps Tune's `_setup_signal_catching` (ray/tune/tune.py) to keep a reference to it, and watches
    each event for a stop that also ended the local Ray (`_skip_cleanup_once_ray_is_gone`).
    """
    tune_run = importlib.import_module("ray.tune.tune")
    setup = tune_run._setup_signal_catching
    events: list[threading.Event] = []
    helpers, fitted = running_children(), threading.Event()

    def recording_setup() -> threading.Event:
        events.append(setup())
        threading.Thread(target=_skip_cleanup_once_ray_is_gone, args=(events[-1], fitted, helpers), daemon=True).start()
        return events[-1]

    tune_run._setup_signal_catching = recording_setup
    try:
        yield events
    finally:
        fitted.set()
        tune_run._setup_signal_catching = setup


def _skip_cleanup_once_ray_is_gone(stopped: threading.Event, fitted: threading.Event, helpers: dict[int, str],
                                   save_s: float = 5.0) -> None:
    """Interrupt Tune's cleanup when the stop signal also ended the local Ray's own processes (HELPERS).

    A SIGTERM to the whole process group (systemd, Slurm's scancel, `kill -- -PGID`) reaches the GCS and raylet too;
    Tune saves its state (milliseconds on a local disk) and then waits for its trial actors on a GCS that is going
    away, until Ray's 60 s timeout ends the process with status 1. A second SIGINT is Tune's own "skip the cleanup":
    the search then stops as interrupted (status 130, resumable). Ctrl-C does not end Ray's processes, and a search
    on a cluster started none of them (HELPERS is empty): both keep Tune's cleanup.
    """
    while not stopped.wait(0.5):
        if fitted.is_set():
            return
    started = time.monotonic()
    if not one_ends_within(helpers, save_s):
        return
    time.sleep(max(0.0, save_s - (time.monotonic() - started)))
    if not fitted.is_set():
        os.kill(os.getpid(), signal.SIGINT)


def _scheduler(cfg: ExperimentConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    search = cfg.search
    if search.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=1, reduction_factor=2)
    if search.scheduler == "pbt":
        mutations = {k: v for k, v in _tune_space(search.space).items() if isinstance(search.space[k], dict)}
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=search.pbt_interval,
                                       hyperparam_mutations=mutations)
    return None


def _ray_row(result: Any, run_dir: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    trial = metrics.get("trial_id") or Path(result.path).name
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = os.path.relpath(result.checkpoint.path, run_dir)
    history = result.metrics_dataframe
    timing = {}
    if history is not None and len(history) and "time/report" in history:
        timing = {"trial_start": float(history["time/trial_start"].iloc[0]),
                  "first_report": float(history["time/report"].iloc[0]),
                  "last_report": float(history["time/report"].iloc[-1]),
                  "first_epoch_s": float(history["time/epoch_s"].iloc[0]) if "time/epoch_s" in history else None,
                  "reports": len(history)}
    status = "ERROR" if result.error is not None else finished_status(metrics, cfg)
    config = dict(result.config or {})
    params = config.get(SHARED_MEMBER) or {k: config.get(k) for k in cfg.search.space}
    return trial_row(trial, status, params, metrics, checkpoint,
                str(result.error) if result.error is not None else None, timing)
