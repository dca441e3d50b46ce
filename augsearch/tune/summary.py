"""The results of a search: one row per trial, `summary.csv` / `summary.json`, and the printed table.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from augsearch.artifacts.layout import SUMMARY_CSV, SUMMARY_JSON
from augsearch.atomic import write_json, write_text
from augsearch.config import ExperimentConfig
from augsearch.tune.export import best_trial, selection_note


@dataclass
class SearchResult:
    run_dir: Path
    rows: list[dict[str, Any]]  # summary rows, see `summary_rows`
    best: dict[str, Any] | None  # the row with the best search.metric, None when no trial reported it
    interrupted: bool = False  # stopped by Ctrl-C before every trial finished: resume it, export nothing yet

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] == "ERROR"]


def finished_status(metrics: dict[str, Any], cfg: ExperimentConfig) -> str:
    """TERMINATED when the trial trained every epoch, STOPPED when a scheduler ended it early."""
    return "TERMINATED" if int(metrics.get("epoch", 0)) >= cfg.train.epochs else "STOPPED"


def trial_row(trial: str, status: str, params: dict[str, Any], metrics: dict[str, Any], checkpoint: str | None,
         error: str | None, timing: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in metrics.items()
            if (k.startswith(("val/", "train/")) or k in ("epoch", "resumed_epoch")) and isinstance(v, (int, float))}
    return {"trial": trial, "status": status, "params": params, "metrics": kept, "checkpoint": checkpoint,
            "node_id": metrics.get("node_id"), "error": error, "timing": timing}


def finish_search(run_dir: Path, rows: list[dict[str, Any]], cfg: ExperimentConfig, *,
                  interrupted: bool = False) -> SearchResult:
    write_summary(run_dir, rows, cfg, interrupted=interrupted)
    print(format_table(rows, cfg.search.metric), flush=True)
    if interrupted:  # half-trained trials must not look like results
        return SearchResult(run_dir=run_dir, rows=rows, best=None, interrupted=True)
    best = best_trial(rows, cfg.search.metric, cfg.search.mode)
    if best is not None:
        print(f"best {selection_note(rows, best, cfg.search.metric)} ({cfg.search.mode}); export it with: "
              f"augsearch export {run_dir} --out DIR", flush=True)
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


def write_summary(run_dir: Path, rows: list[dict[str, Any]], cfg: ExperimentConfig, *,
                  interrupted: bool = False) -> None:
    header, body = _table(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in line] for line in body])
    write_text(run_dir / SUMMARY_CSV, buffer.getvalue())
    write_json(run_dir / SUMMARY_JSON, {"metric": cfg.search.metric, "mode": cfg.search.mode,
                                        "interrupted": interrupted, "trials": rows})


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / SUMMARY_JSON
    return json.loads(path.read_text())["trials"] if path.is_file() else []
