"""How far a search or a training run has got, read from its folder: the final summary or the live per-epoch metrics.

A finished search leaves summary.json (one row per trial). While a search runs, or after it was stopped, each
trial's `<trial>/fit/metrics.jsonl` (one JSON line per epoch, written by `fit` whatever runs it) and
`<trial>/fit/config.json` tell how far it got. This module turns both into rows of the summary's form (trial,
status, params, metrics, checkpoint), so one table printer and one best-trial rule serve finished and running
searches. Ray's own progress files are not read: their layout belongs to Ray and changes between its versions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from augsearch.artifacts.layout import CHECKPOINT_NAME, CONFIG_NAME, FIT_DIR, METRICS_NAME, SUMMARY_JSON
from augsearch.errors import AugsearchError
from augsearch.tune.export import best_trial
from augsearch.tune.search import read_manifest


class ProgressError(AugsearchError):
    """A metrics file that is not the JSON lines `fit` writes."""


@dataclass
class SearchProgress:
    run_dir: Path
    rows: list[dict[str, Any]]  # summary-form rows, one per started trial, sorted by trial
    metric: str  # search.metric, e.g. "val/dice_rare"
    mode: str  # "max" or "min"
    epochs: int  # train.epochs: a trial that reached it has finished
    finished: bool  # True: rows are the search's own summary.json; False: read from the trials' metrics

    @property
    def best(self) -> dict[str, Any] | None:
        """The row with the best value of the search metric among trials with a checkpoint (export's rule)."""
        return best_trial(self.rows, self.metric, self.mode)


def read_metrics(fit_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of one `fit` run, ordered by epoch; an epoch trained again after a resume keeps its
    last record. A last line cut short by a killed process is left out; any other unreadable line is an error."""
    path = Path(fit_dir) / METRICS_NAME
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    by_epoch: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            if number == len(lines):
                break
            raise ProgressError(f"{path}:{number} is not a metrics record of `fit` (a JSON object with 'epoch'): "
                                f"{err}; the file was edited or written by something else") from None
        by_epoch[epoch] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def trial_dirs(run_dir: Path) -> list[Path]:
    """Every started trial of a search folder (the ones with a fit/ folder), by name."""
    return sorted(path for path in Path(run_dir).iterdir() if (path / FIT_DIR).is_dir())


def search_progress(run_dir: Path, *, running: bool = False) -> SearchProgress:
    """The trial rows of a search folder: summary.json once the search has ended (and `running` is False),
    otherwise one row per started trial from its metrics. Trials Ray has not started yet have no folder and no row."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    metric, mode = manifest["metric"], manifest["mode"]
    epochs = int(manifest["config"]["train"]["epochs"])
    summary = run_dir / SUMMARY_JSON
    ended = json.loads(summary.read_text()) if summary.is_file() and not running else None
    if ended is not None and not ended.get("interrupted"):  # an interrupted search's summary is not its end
        return SearchProgress(run_dir, ended["trials"], metric, mode, epochs, finished=True)
    rows = [_live_row(path, run_dir, manifest, epochs, running) for path in trial_dirs(run_dir)]
    return SearchProgress(run_dir, rows, metric, mode, epochs, finished=False)


def _live_row(trial_dir: Path, run_dir: Path, manifest: dict[str, Any], epochs: int, running: bool) -> dict[str, Any]:
    fit_dir = trial_dir / FIT_DIR
    history = read_metrics(fit_dir)
    config_path = fit_dir / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    validated = [record for record in history if manifest["metric"] in record]
    epoch = int(history[-1]["epoch"]) if history else 0
    metrics: dict[str, Any] = {"epoch": epoch}
    if history:
        metrics["train/loss"] = history[-1].get("train/loss")
    if validated:
        metrics.update({k: v for k, v in validated[-1].items() if k.startswith("val/")})
    if epoch >= epochs:
        status = "TERMINATED"
    else:
        status = "RUNNING" if running else "UNFINISHED"
    checkpoint = os.path.relpath(fit_dir, run_dir) if (fit_dir / CHECKPOINT_NAME).is_file() else None
    params = {key: config_value(config, key) for key in manifest["space"]}
    return {"trial": trial_dir.name, "status": status, "params": params, "metrics": metrics, "checkpoint": checkpoint}


def config_value(tree: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key ('train.epochs') of a config tree, None where it is absent."""
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
