"""Searches over experiment configs: one `fit` per trial, on Ray Tune or in-process, with one results layout.

A search directory RUN_DIR holds (names in artifacts/layout.py):

    search.json              manifest: base config, space, metric/mode, resources, backend ("ray" or "local")
    <trial>/fit/             the trial's `fit` run dir: checkpoint.pt, policy.json, metrics.jsonl, config.json, tb/
    <trial>/checkpoint_NNNNNN/   (ray) Ray Tune's copies of each reported checkpoint (checkpoint.pt + policy.json),
                             next to Ray's progress.csv, result.json and TensorBoard events for the trial
    summary.csv, summary.json    one row per trial: varied values, last validation metrics, status, checkpoint dir
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from augsearch.artifacts.layout import MANIFEST_NAME
from augsearch.atomic import write_json
from augsearch.config import ExperimentConfig, config_from_dict
from augsearch.errors import SearchError
from augsearch.textfiles import MalformedText, read_json
from augsearch.tune.local import run_local
from augsearch.tune.ray_tune import check_resources, ray_session, run_ray
from augsearch.tune.space import absolute_paths, seeded_repeats, trial_params, validate_space
from augsearch.tune.summary import SearchResult, read_rows
from augsearch.tune.trial import prepare_data

MANIFEST_FORMAT = "augsearch-search"
MANIFEST_VERSION = 1


def new_search(cfg: ExperimentConfig, run_dir: Path, *, address: str | None = None,
               use_ray: bool = True) -> SearchResult:
    """Validate, then run every trial of cfg.search over cfg; writes RUN_DIR (which must not exist or be empty)."""
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SearchError(f"--out {run_dir} already holds files; pass a new directory, or --resume {run_dir}")
    base, space = absolute_paths(cfg.to_dict(), cfg.search.space)
    base["search"]["space"], base["search"]["num_samples"] = seeded_repeats(space, cfg.search.num_samples, cfg.seed)
    cfg = config_from_dict(base)
    search = cfg.search
    if not search.metric.startswith("val/"):
        raise SearchError(f"search.metric must be a validation metric ('val/...'), got {search.metric!r}; "
                          f"trials are ranked on validation data, never on test data")
    validate_space(base, search.space)
    if search.scheduler == "pbt" and not any(isinstance(spec, dict) for spec in search.space.values()):
        raise SearchError("search.scheduler='pbt' perturbs the distribution keys of search.space and there is none; "
                          "add one such as 'augment.tra.lr' = {loguniform = [0.01, 0.1]}")
    if search.policy_sharing == "shared":
        _check_shared(cfg, use_ray)
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "backend": "ray" if use_ray else "local",
                "config": base, "space": search.space, "metric": search.metric, "mode": search.mode,
                "config_hash": cfg.fingerprint(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not use_ray:
        if search.scheduler != "none":
            raise SearchError(f"search.scheduler={search.scheduler!r} needs Ray (trials run side by side); "
                              f"drop --no-ray or set search.scheduler=none")
        manifest["trials"] = [{"trial": f"trial_{i:05d}", "params": p}
                              for i, p in enumerate(trial_params(search, cfg.seed))]
        prepare_data(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / MANIFEST_NAME, manifest)
        return run_local(run_dir, manifest, finished={})
    with ray_session(address):
        check_resources(search.cpus_per_trial, search.gpus_per_trial, _together(cfg))
        prepare_data(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / MANIFEST_NAME, manifest)
        return run_ray(run_dir, manifest, restore=False)


def _check_shared(cfg: ExperimentConfig, use_ray: bool) -> None:
    """A shared search runs search.num_workers workers around one policy server per point of its (grid) space."""
    search = cfg.search
    drawn = [key for key, spec in search.space.items() if isinstance(spec, dict)]
    if drawn:
        raise SearchError(f"search.policy_sharing='shared' learns one policy per point of a grid, but search.space "
                          f"draws {', '.join(drawn)} at random (each worker would draw its own); give these keys a "
                          f"list of values, e.g. 'augment.tra.lr' = [0.025, 0.05]")
    if search.scheduler != "none":
        raise SearchError(f"search.policy_sharing='shared' needs scheduler='none', got {search.scheduler!r}: a "
                          f"scheduler that stops or perturbs one worker would leave its group's rounds waiting")
    if not (cfg.augment.tra.learn or cfg.augment.tea.learn):
        raise SearchError("search.policy_sharing='shared' needs a learned policy (augment.tra.learn or "
                          "augment.tea.learn); there is nothing to share")
    if not use_ray and search.num_workers > 1:
        raise SearchError(f"search.num_workers={search.num_workers} workers run side by side on Ray; drop --no-ray, "
                          f"or set search.num_workers=1")


def resume_search(run_dir: Path, *, address: str | None = None) -> SearchResult:
    """Finish an interrupted search: finished trials stay as they are, the rest continue from their checkpoints."""
    run_dir = Path(run_dir).resolve()
    manifest = read_manifest(run_dir)
    if manifest["backend"] == "local":
        finished = {row["trial"]: row for row in read_rows(run_dir) if row["status"] == "TERMINATED"}
        return run_local(run_dir, manifest, finished=finished)
    if not (run_dir / "tuner.pkl").is_file():
        raise SearchError(f"{run_dir} has a search manifest but no Ray Tune state (tuner.pkl); it never started, "
                          f"so run it again with augsearch search CONFIG --out NEW_DIR")
    cfg = config_from_dict(manifest["config"], source=str(run_dir / MANIFEST_NAME))
    with ray_session(address):
        check_resources(cfg.search.cpus_per_trial, cfg.search.gpus_per_trial, _together(cfg))
        return run_ray(run_dir, manifest, restore=True)


def _together(cfg: ExperimentConfig) -> int:
    """How many trials must run at the same time: every worker of a shared search (its rounds wait for each)."""
    return cfg.search.num_workers if cfg.search.policy_sharing == "shared" else 1


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        raise SearchError(f"{run_dir} is not a search directory (no {MANIFEST_NAME}); pass the --out directory of "
                          f"an `augsearch search` run")
    try:
        manifest = read_json(path)
    except MalformedText as err:
        raise SearchError(f"{path}: {err}; it was not written by augsearch search") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise SearchError(f"{path} is not an augsearch search manifest (format {MANIFEST_FORMAT!r} expected)")
    return manifest
