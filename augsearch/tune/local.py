"""Searches without Ray: the trials one after the other in this process (`--no-ray`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from augsearch.artifacts.layout import CHECKPOINT_NAME, FIT_DIR, MANIFEST_NAME
from augsearch.config import config_from_dict
from augsearch.errors import AugsearchError
from augsearch.learn.server import InProcessPolicyServer, state_path
from augsearch.tune.summary import (
    SearchResult,
    finish_search,
    finished_status,
    trial_row,
    write_summary,
)
from augsearch.tune.space import SHARED_GROUP
from augsearch.tune.trial import CRASH_ENV, run_trial, trial_config


def run_local(run_dir: Path, manifest: dict[str, Any], *, finished: dict[str, dict[str, Any]]) -> SearchResult:
    """Trials one after another in this process, retried from their last checkpoint up to search.max_failures."""
    cfg = config_from_dict(manifest["config"], source=str(run_dir / MANIFEST_NAME))
    crash_marker = os.environ.get(CRASH_ENV)
    rows = {trial["trial"]: trial_row(trial["trial"], "PENDING", trial["params"], {}, None, None, {})
            for trial in manifest["trials"]}
    rows.update(finished)
    try:
        _run_trials(run_dir, manifest, cfg, rows, finished, crash_marker)
    except KeyboardInterrupt:
        return finish_search(run_dir, list(rows.values()), cfg, interrupted=True)
    return finish_search(run_dir, list(rows.values()), cfg)


def _run_trials(run_dir: Path, manifest: dict[str, Any], cfg: Any, rows: dict[str, dict[str, Any]],
                finished: dict[str, dict[str, Any]], crash_marker: str | None) -> None:
    for trial in manifest["trials"]:
        trial_id, params = trial["trial"], trial["params"]
        if trial_id in finished:
            continue
        server = None
        if cfg.search.policy_sharing == "shared":
            server = _group_server(run_dir, manifest["config"], params, cfg)
        fit_dir = run_dir / trial_id / FIT_DIR
        history: list[dict[str, Any]] = []

        def report(metrics: dict[str, Any], checkpoint_path: Path | None, policy_path: Path | None) -> None:
            history.append(metrics)

        failures, error = 0, None
        while True:
            resume = fit_dir / CHECKPOINT_NAME if (fit_dir / CHECKPOINT_NAME).is_file() else None
            try:
                run_trial(trial_id=trial_id, run_dir=run_dir, base=manifest["config"], params=params,
                          cpus=cfg.search.cpus_per_trial, resume=resume, crash_marker=crash_marker, report=report,
                          policy_server=server)
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
        status = "ERROR" if error else finished_status(last, cfg)
        rows[trial_id] = trial_row(trial_id, status, params, last, checkpoint, error, timing)
        write_summary(run_dir, list(rows.values()), cfg)


def _group_server(run_dir: Path, base: dict[str, Any], params: dict[str, Any], cfg: Any) -> InProcessPolicyServer:
    """The in-process server of the trial's group (one worker each without Ray), resumed from its state file."""
    group_cfg = trial_config(base, params, cfg.search.cpus_per_trial)
    return InProcessPolicyServer(group_cfg.augment, group_cfg.train, state_path(run_dir, params.get(SHARED_GROUP, 0)))
