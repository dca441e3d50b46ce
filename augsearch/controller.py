"""Searches over experiment configs: one `fit` per trial, on Ray Tune or in-process, with one results layout.

This is the only module that imports ray, and only inside the functions that need it, so `--no-ray` searches run
where Ray is missing. A search directory RUN_DIR holds:

    search.json              manifest: base config, space, metric/mode, resources, backend ("ray" or "local")
    <trial>/fit/             the trial's `fit` run dir: checkpoint.pt, policy.json, metrics.jsonl, config.json, tb/
    <trial>/checkpoint_NNNNNN/   (ray) Ray Tune's copies of each reported checkpoint (checkpoint.pt + policy.json),
                             next to Ray's progress.csv, result.json and TensorBoard events for the trial
    summary.csv, summary.json    one row per trial: varied values, last validation metrics, status, checkpoint dir

Trials resume from their last checkpoint after a worker failure (Ray restarts the trial, `tune.get_checkpoint()`
hands back the last reported checkpoint, `fit(resume=...)` continues from its epoch); PBT's exploit step is the same
mechanism with the donor's checkpoint, and the trial re-reads its (perturbed) parameters each time it starts.

Test hook: the environment variable AUGSEARCH_TEST_CRASH_ONCE=<marker file>, read by the driver when a search
starts, makes the first trial that reports a checkpoint create the marker and raise `SimulatedCrash`; every later
report sees the marker and carries on. Tests use it to check restart from the last checkpoint and `--resume`.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import itertools
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from augsearch.atomic import write_json, write_text
from pydantic import BaseModel

from augsearch.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict
from augsearch.errors import AugsearchError
from augsearch.export import CHECKPOINT_NAME, MANIFEST_NAME, POLICY_NAME, SUMMARY_JSON, best_trial

MANIFEST_FORMAT = "augsearch-search"
MANIFEST_VERSION = 1
SUMMARY_CSV = "summary.csv"
FIT_DIR = "fit"
CRASH_ENV = "AUGSEARCH_TEST_CRASH_ONCE"
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
CONNECT_TIMEOUT_S = 5.0


class SearchError(AugsearchError):
    """A search that cannot start or resume: bad space, resources the cluster lacks, unreachable address."""


class SimulatedCrash(RuntimeError):
    """Raised once by the AUGSEARCH_TEST_CRASH_ONCE test hook."""


@dataclass
class SearchResult:
    run_dir: Path
    rows: list[dict[str, Any]]  # summary rows, see `summary_rows`
    best: dict[str, Any] | None  # the row with the best search.metric, None when no trial reported it

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] == "ERROR"]


# ----------------------------------------------------------------------------------------------- space


def config_keys() -> list[str]:
    """Every dotted leaf key of the config schema, e.g. 'augment.tra.lr', 'data.split.fold'."""
    keys: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            section = _section_type(field.annotation)
            if section is None:
                keys.append(prefix + name)
            else:
                walk(section, f"{prefix}{name}.")

    walk(ExperimentConfig, "")
    return keys


def _section_type(annotation: Any) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def validate_space(base: dict[str, Any], space: dict[str, Any]) -> None:
    """Check every space key names a config key and every value it can take validates; SearchError otherwise."""
    valid = config_keys()
    for key, spec in space.items():
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
            near += [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and k not in near]
            hint = ", ".join(near[:6]) if near else ", ".join(k for k in valid if k.startswith("augment.tra."))
            raise SearchError(
                f"search.space key {key!r} is not a config key; nearest valid keys: {hint}. "
                f"Space keys are dotted config keys such as augment.tra.lr or data.split.fold."
            )
        if key.startswith("search."):
            raise SearchError(f"search.space key {key!r} varies the search itself; vary training keys only")
        for value in _candidate_values(key, spec):
            try:
                config_from_dict(apply_overrides(base, {key: value}), source=f"search.space[{key!r}]")
            except ConfigError as err:
                raise SearchError(f"search.space[{key!r}] can take {value!r}, which the config rejects:\n{err}") from None


def _candidate_values(key: str, spec: Any) -> list[Any]:
    """The values a space entry can produce (range ends for continuous ones), after checking its form."""
    form = (
        f"search.space[{key!r}] must be a list (grid), or one of {{choice=[...]}}, {{uniform=[a, b]}}, "
        f"{{loguniform=[a, b]}}, {{randint=[a, b]}} (b exclusive)"
    )
    if isinstance(spec, list):
        if not spec:
            raise SearchError(f"{form}; got an empty list")
        return spec
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SearchError(f"{form}; got {spec!r}")
    (kind, args), = spec.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SearchError(f"{form}; got choice={args!r}")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
            and args[0] < args[1]):
        raise SearchError(f"{form}; got {kind}={args!r}, which is not two increasing numbers")
    if kind == "loguniform" and args[0] <= 0:
        raise SearchError(f"{form}; got loguniform={args!r}, whose lower end must be positive")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise SearchError(f"{form}; got randint={args!r}, which needs integers")
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


def expand_trials(space: dict[str, Any], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """In-process version of Tune's variant generation: grid product x num_samples, random keys drawn per trial."""
    rng = np.random.default_rng(seed)
    grid_keys = [k for k, v in space.items() if isinstance(v, list)]
    grid = list(itertools.product(*(space[k] for k in grid_keys)))
    trials = []
    for _ in range(num_samples):
        for point in grid:
            params = dict(zip(grid_keys, point))
            for key, spec in space.items():
                if isinstance(spec, dict):
                    params[key] = _draw(spec, rng)
            trials.append({key: params[key] for key in space})
    return trials


def _draw(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    (kind, args), = spec.items()
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    return int(rng.integers(args[0], args[1]))


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


PATH_KEYS = ("data.root", "data.cache_dir", "data.split.splits_file", "train.init_checkpoint", "augment.policy")


def absolute_paths(tree: dict[str, Any], space: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config and space with relative paths made absolute: trials run in Ray's own working directories.

    data.root is always a path (it may not exist yet: the benchmark is generated there); the other keys only when
    they name an existing file or folder (augment.policy is otherwise a preset name).
    """
    def fix(key: str, value: Any) -> Any:
        if not isinstance(value, str) or Path(value).is_absolute():
            return value
        if key == "data.root" or Path(value).exists():
            return str(Path(value).resolve())
        return value

    def lookup(dotted: str) -> Any:
        node: Any = tree
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    tree = apply_overrides(tree, {key: fix(key, lookup(key)) for key in PATH_KEYS if lookup(key) is not None})
    space = json.loads(json.dumps(space))
    for key in PATH_KEYS:
        spec = space.get(key)
        if isinstance(spec, list):
            space[key] = [fix(key, v) for v in spec]
        elif isinstance(spec, dict) and "choice" in spec:
            spec["choice"] = [fix(key, v) for v in spec["choice"]]
    return tree, space


def prepare_data(cfg: ExperimentConfig) -> None:
    """Generate the synthetic benchmark once in the driver, so concurrent trials never race to write it."""
    from augsearch.data.synthetic import ensure_dataset

    ensure_dataset(cfg.data)


def trial_config(base: dict[str, Any], params: dict[str, Any], cpus: float) -> ExperimentConfig:
    """The trial's config: base + varied values, with torch threads set to the trial's CPUs."""
    overrides = {**params, "train.num_threads": max(1, int(cpus))}
    return config_from_dict(apply_overrides(base, overrides), source="trial config")


# ----------------------------------------------------------------------------------------------- trial


def _trial_body(
    *,
    trial_id: str,
    run_dir: Path,
    base: dict[str, Any],
    params: dict[str, Any],
    cpus: float,
    resume: Path | None,
    crash_marker: str | None,
    report: Callable[[dict[str, Any], Path | None, Path | None], None],
) -> None:
    """One fit of one trial: shared by the Ray trial function and the in-process runner."""
    started = time.time()
    import torch

    from augsearch.train import fit

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

    fit(cfg, run_dir / trial_id / FIT_DIR, callbacks=[on_epoch], resume=resume)


def _checkpoint_epoch(path: Path) -> int:
    from augsearch.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["epoch"])


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

    _trial_body(trial_id=trial_id, run_dir=run_dir, base=setup["base"], params=params, cpus=setup["cpus"],
                resume=resume, crash_marker=setup.get("crash_marker"), report=report)


def trial_dirname(trial: Any) -> str:
    """Ray trial directories are named by trial id, like the in-process runner's."""
    return str(trial.trial_id)


# ----------------------------------------------------------------------------------------------- ray session


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast with a SearchError when ADDR (host:port or ray://host:port) does not accept connections."""
    if address == "auto":
        return
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
    if address:
        check_reachable(address)
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        if _is_loopback(host):
            kwargs["_node_ip_address"] = "127.0.0.1"
        if (Path.home() / ".ray" / "auth_token").is_file() or os.environ.get("RAY_AUTH_TOKEN"):
            # `ray start` turns token authentication on when a token exists; a joining driver must send it too
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def check_resources(cpus: float, gpus: float) -> None:
    """SearchError when no alive node can hold one trial (before anything is launched or written)."""
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


# ----------------------------------------------------------------------------------------------- search


def new_search(cfg: ExperimentConfig, run_dir: Path, *, address: str | None = None,
               use_ray: bool = True) -> SearchResult:
    """Validate, then run every trial of cfg.search over cfg; writes RUN_DIR (which must not exist or be empty)."""
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SearchError(f"--out {run_dir} already holds files; pass a new directory, or --resume {run_dir}")
    base, space = absolute_paths(cfg.to_dict(), cfg.search.space)
    base["search"]["space"] = space
    cfg = config_from_dict(base)
    search = cfg.search
    if not search.metric.startswith("val/"):
        raise SearchError(f"search.metric must be a validation metric ('val/...'), got {search.metric!r}; "
                          f"trials are ranked on validation data, never on test data")
    validate_space(base, search.space)
    if search.scheduler == "pbt" and not any(isinstance(spec, dict) for spec in search.space.values()):
        raise SearchError("search.scheduler='pbt' perturbs the distribution keys of search.space and there is none; "
                          "add one such as 'augment.tra.lr' = {loguniform = [0.01, 0.1]}")
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "backend": "ray" if use_ray else "local",
                "config": base, "space": search.space, "metric": search.metric, "mode": search.mode,
                "config_hash": cfg.fingerprint(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not use_ray:
        if search.scheduler != "none":
            raise SearchError(f"search.scheduler={search.scheduler!r} needs Ray (trials run side by side); "
                              f"drop --no-ray or set search.scheduler=none")
        manifest["trials"] = [{"trial": f"trial_{i:05d}", "params": p}
                              for i, p in enumerate(expand_trials(search.space, search.num_samples, cfg.seed))]
        prepare_data(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / MANIFEST_NAME, manifest)
        return _run_local(run_dir, manifest, finished={})
    with ray_session(address):
        check_resources(search.cpus_per_trial, search.gpus_per_trial)
        prepare_data(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / MANIFEST_NAME, manifest)
        return _run_ray(run_dir, manifest, restore=False)


def resume_search(run_dir: Path, *, address: str | None = None) -> SearchResult:
    """Finish an interrupted search: finished trials stay as they are, the rest continue from their checkpoints."""
    run_dir = Path(run_dir).resolve()
    manifest = read_manifest(run_dir)
    if manifest["backend"] == "local":
        finished = {row["trial"]: row for row in _read_rows(run_dir) if row["status"] == "TERMINATED"}
        return _run_local(run_dir, manifest, finished=finished)
    if not (run_dir / "tuner.pkl").is_file():
        raise SearchError(f"{run_dir} has a search manifest but no Ray Tune state (tuner.pkl); it never started, "
                          f"so run it again with augsearch search CONFIG --out NEW_DIR")
    cfg = config_from_dict(manifest["config"], source=str(run_dir / MANIFEST_NAME))
    with ray_session(address):
        check_resources(cfg.search.cpus_per_trial, cfg.search.gpus_per_trial)
        return _run_ray(run_dir, manifest, restore=True)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        raise SearchError(f"{run_dir} is not a search directory (no {MANIFEST_NAME}); pass the --out directory of "
                          f"an `augsearch search` run")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SearchError(f"{path} is not valid JSON ({err}); it was not written by augsearch search") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise SearchError(f"{path} is not an augsearch search manifest (format {MANIFEST_FORMAT!r} expected)")
    return manifest


def _run_ray(run_dir: Path, manifest: dict[str, Any], *, restore: bool) -> SearchResult:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    cfg = config_from_dict(manifest["config"], source=str(run_dir / MANIFEST_NAME))
    search = cfg.search
    setup = {"run_dir": str(run_dir), "base": manifest["config"], "cpus": search.cpus_per_trial,
             "crash_marker": os.environ.get(CRASH_ENV)}
    resources = {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(ray_trial, setup=setup), resources)
    if restore:
        tuner = tune.Tuner.restore(str(run_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_tune_space(search.space),
            tune_config=tune.TuneConfig(
                metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                scheduler=_scheduler(cfg), trial_dirname_creator=trial_dirname,
                # Tune ignores TuneConfig.max_concurrent_trials when given a variant generator: the limit goes here
                search_alg=BasicVariantGenerator(random_state=cfg.seed,
                                                 max_concurrent=search.max_concurrent_trials or 0),
            ),
            run_config=tune.RunConfig(
                name=run_dir.name, storage_path=str(run_dir.parent),
                failure_config=tune.FailureConfig(max_failures=search.max_failures),
                # PBT copies a donor's checkpoint that may be several reports old: keep them all for PBT
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if search.scheduler == "pbt" else 2),
            ),
        )
    grid = tuner.fit()
    rows = [_ray_row(result, run_dir, cfg) for result in grid]
    rows.sort(key=lambda row: row["trial"])
    return _finish(run_dir, rows, cfg)


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
                  "reports": int(len(history))}
    status = "ERROR" if result.error is not None else _finished_status(metrics, cfg)
    return _row(trial, status, {k: (result.config or {}).get(k) for k in cfg.search.space}, metrics, checkpoint,
                str(result.error) if result.error is not None else None, timing)


def _finished_status(metrics: dict[str, Any], cfg: ExperimentConfig) -> str:
    """TERMINATED when the trial trained every epoch, STOPPED when a scheduler ended it early."""
    return "TERMINATED" if int(metrics.get("epoch", 0)) >= cfg.train.epochs else "STOPPED"


def _row(trial: str, status: str, params: dict[str, Any], metrics: dict[str, Any], checkpoint: str | None,
         error: str | None, timing: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in metrics.items()
            if (k.startswith(("val/", "train/")) or k in ("epoch", "resumed_epoch")) and isinstance(v, (int, float))}
    return {"trial": trial, "status": status, "params": params, "metrics": kept, "checkpoint": checkpoint,
            "node_id": metrics.get("node_id"), "error": error, "timing": timing}


def _run_local(run_dir: Path, manifest: dict[str, Any], *, finished: dict[str, dict[str, Any]]) -> SearchResult:
    """Trials one after another in this process, retried from their last checkpoint up to search.max_failures."""
    cfg = config_from_dict(manifest["config"], source=str(run_dir / MANIFEST_NAME))
    crash_marker = os.environ.get(CRASH_ENV)
    rows = {trial["trial"]: _row(trial["trial"], "PENDING", trial["params"], {}, None, None, {})
            for trial in manifest["trials"]}
    rows.update(finished)
    for trial in manifest["trials"]:
        trial_id, params = trial["trial"], trial["params"]
        if trial_id in finished:
            continue
        fit_dir = run_dir / trial_id / FIT_DIR
        history: list[dict[str, Any]] = []

        def report(metrics: dict[str, Any], checkpoint_path: Path | None, policy_path: Path | None) -> None:
            history.append(metrics)

        failures, error = 0, None
        while True:
            resume = fit_dir / CHECKPOINT_NAME if (fit_dir / CHECKPOINT_NAME).is_file() else None
            try:
                _trial_body(trial_id=trial_id, run_dir=run_dir, base=manifest["config"], params=params,
                            cpus=cfg.search.cpus_per_trial, resume=resume, crash_marker=crash_marker, report=report)
                error = None
                break
            except AugsearchError:
                raise
            except Exception as err:  # a crashed trial restarts from its checkpoint, like a Ray worker failure
                failures += 1
                error = f"{type(err).__name__}: {err}"
                if failures > cfg.search.max_failures:
                    print(f"[{trial_id}] failed ({error}); gave up after {failures} failures", file=sys.stderr)
                    break
                print(f"[{trial_id}] failed ({error}); restart {failures}/{cfg.search.max_failures} from its last "
                      f"checkpoint", file=sys.stderr, flush=True)
        last = history[-1] if history else {}
        timing = {}
        if history:
            timing = {"trial_start": history[0]["time/trial_start"], "first_report": history[0]["time/report"],
                      "last_report": last["time/report"], "first_epoch_s": history[0].get("time/epoch_s"),
                      "reports": len(history)}
        checkpoint = os.path.relpath(fit_dir, run_dir) if (fit_dir / CHECKPOINT_NAME).is_file() else None
        status = "ERROR" if error else _finished_status(last, cfg)
        rows[trial_id] = _row(trial_id, status, params, last, checkpoint, error, timing)
        _write_summary(run_dir, list(rows.values()), cfg)
    return _finish(run_dir, list(rows.values()), cfg)


# ----------------------------------------------------------------------------------------------- summary


def _finish(run_dir: Path, rows: list[dict[str, Any]], cfg: ExperimentConfig) -> SearchResult:
    _write_summary(run_dir, rows, cfg)
    print(format_table(rows, cfg.search.metric), flush=True)
    best = best_trial(rows, cfg.search.metric, cfg.search.mode)
    if best is not None:
        print(f"best trial by {cfg.search.metric} ({cfg.search.mode}): {best['trial']} "
              f"{best['metrics'][cfg.search.metric]:.4f}; export it with: augsearch export {run_dir} --out DIR",
              flush=True)
    return SearchResult(run_dir=run_dir, rows=rows, best=best)


def _table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    params = sorted({k for r in rows for k in r["params"]})
    metrics = sorted({k for r in rows for k in r["metrics"]}, key=lambda k: (k != "epoch", k))
    header = ["trial", *params, *metrics, "status", "checkpoint"]
    body = [[r["trial"], *(r["params"].get(k) for k in params), *(r["metrics"].get(k) for k in metrics),
             r["status"], r["checkpoint"] or ""] for r in rows]
    return header, body


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    header, body = _table(rows)
    cells = [header] + [[_fmt(v) for v in line] for line in body]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return f"search summary (ranked by {metric}):\n" + "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_summary(run_dir: Path, rows: list[dict[str, Any]], cfg: ExperimentConfig) -> None:
    header, body = _table(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in line] for line in body])
    write_text(run_dir / SUMMARY_CSV, buffer.getvalue())
    write_json(run_dir / SUMMARY_JSON, {"metric": cfg.search.metric, "mode": cfg.search.mode, "trials": rows})


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / SUMMARY_JSON
    return json.loads(path.read_text())["trials"] if path.is_file() else []
