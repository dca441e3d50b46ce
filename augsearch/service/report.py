"""A static, self-contained HTML page about a search or a training run: what was learned and how it got there.

Sections: a comparison table (each trial's validation metrics, the best marked; baseline rows from a results.csv when
one is given or lies in the run folder), validation curves per trial, the learned TRA probabilities per class group
(heatmaps of the final policy and P(op applied) over training) and the TEA weights (final top-K and their course).
Figures are PNGs inlined as base64, so the file opens anywhere without the run folder.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from augsearch.artifacts.layout import CONFIG_NAME, FIT_DIR, MANIFEST_NAME, METRICS_NAME, POLICY_NAME
from augsearch.atomic import write_text
from augsearch.errors import AugsearchError
from augsearch.policy.core import Policy
from augsearch.policy.io import load_policy
from augsearch.service import figures
from augsearch.service.progress import config_value, read_metrics, search_progress

BASELINES_NAME = "results.csv"
# The evidence protocol's long table (experiments/protocol/run.py): one value per size, row, seed, TTA, class, metric.
PROTOCOL_COLUMNS = ["size", "row", "seed", "tta", "class", "metric", "value"]
CURVE_PANELS = 4  # validation panels at most, the search metric first


class ReportError(AugsearchError):
    """A folder that is neither a search nor a training run, or a baseline table that cannot be read."""


@dataclass
class _Run:
    """One trained model: a trial of a search, or a training run itself."""

    label: str
    fit_dir: Path
    row: dict[str, Any]  # summary-form row: trial, status, params, metrics, checkpoint
    history: list[dict[str, Any]]  # per-epoch records of metrics.jsonl
    policy: Policy | None


@dataclass
class _Subject:
    title: str
    facts: list[str]
    metric: str
    mode: str
    runs: list[_Run]  # the best first
    best: str | None  # label of the best run by the metric


def build_report(run_dir: str | Path, baselines: str | Path | None = None) -> str:
    """The HTML page for RUN_DIR, a search folder (`augsearch search`, `augsearch submit`) or a training run."""
    run_dir = Path(run_dir)
    subject = _search(run_dir) if (run_dir / MANIFEST_NAME).is_file() else _training_run(run_dir)
    table = Path(baselines) if baselines else run_dir / BASELINES_NAME
    if baselines and not table.is_file():
        raise ReportError(f"--baselines {table} does not exist; pass a results.csv such as "
                          f"experiments/comparison/results.csv")
    return _page(subject, _read_baselines(table) if table.is_file() else None, table)


def write_report(run_dir: str | Path, out: str | Path, baselines: str | Path | None = None) -> Path:
    """Write the page to OUT, replacing an earlier report there but never another file."""
    out = Path(out)
    if out.exists() and not _is_report(out):
        raise ReportError(f"{out} exists and is not an augsearch report; pass another --out")
    write_text(out, build_report(run_dir, baselines))
    return out


def _is_report(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("<!doctype html>") and "<title>augsearch report:" in head


# ----------------------------------------------------------------------------------------------- reading


def _load(fit_dir: Path, label: str, row: dict[str, Any]) -> _Run:
    policy_path = fit_dir / POLICY_NAME
    return _Run(label=label, fit_dir=fit_dir, row=row, history=read_metrics(fit_dir),
                policy=load_policy(policy_path) if policy_path.is_file() else None)


def _search(run_dir: Path) -> _Subject:
    progress = search_progress(run_dir)
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    best = progress.best
    rows = sorted(progress.rows, key=lambda r: (best is None or r["trial"] != best["trial"], r["trial"]))
    runs = [_load(run_dir / row["trial"] / FIT_DIR, row["trial"], row) for row in rows]
    state = "finished" if progress.finished else "not finished (rows from each trial's metrics so far)"
    facts = [f"search of {len(runs)} trial(s), {state}", f"ranked by {progress.metric} ({progress.mode})",
             f"space: {', '.join(manifest['space']) or '-'}", f"folder {run_dir.resolve()}",
             f"created {manifest.get('created', '-')}", f"config sha256 {manifest.get('config_hash', '-')[:12]}"]
    return _Subject(title=manifest["config"]["name"], facts=facts, metric=progress.metric, mode=progress.mode,
                    runs=runs, best=best["trial"] if best else None)


def _training_run(run_dir: Path) -> _Subject:
    if not (run_dir / METRICS_NAME).is_file():
        raise ReportError(f"{run_dir} is neither a search folder (no {MANIFEST_NAME}) nor a training run (no "
                          f"{METRICS_NAME}); pass the --out folder of `augsearch search`, `augsearch submit` or "
                          f"`augsearch train`")
    config_path = run_dir / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    metric = config_value(config, "search.metric") or "val/dice_rare"
    mode = config_value(config, "search.mode") or "max"
    history = read_metrics(run_dir)
    validated = [record for record in history if metric in record]
    epochs = config_value(config, "train.epochs")
    metrics = {"epoch": history[-1]["epoch"], "train/loss": history[-1].get("train/loss")} if history else {}
    if validated:
        metrics.update({k: v for k, v in validated[-1].items() if k.startswith("val/")})
    done = epochs is not None and history and history[-1]["epoch"] >= epochs
    row = {"trial": run_dir.name, "status": "TERMINATED" if done else "UNFINISHED", "params": {},
           "metrics": metrics, "checkpoint": "."}
    name = config.get("name", run_dir.name)
    facts = [f"training run, epoch {metrics.get('epoch', 0)} of {epochs or '?'}", f"folder {run_dir.resolve()}",
             f"augment.mode {config_value(config, 'augment.mode') or '-'}"]
    best = run_dir.name if metric in metrics else None
    return _Subject(title=name, facts=facts, metric=metric, mode=mode, runs=[_load(run_dir, run_dir.name, row)],
                    best=best)


def _read_baselines(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is not a readable CSV table ({err}); pass a results.csv written by "
                          f"experiments/comparison/run.py") from None
    if not rows:
        raise ReportError(f"{path} has a header but no rows; pass a results.csv with baseline rows")
    return _over_seeds(rows) if list(rows[0]) == PROTOCOL_COLUMNS else rows


def _over_seeds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The protocol's long table as one row per (size, row, TTA): its seed count, and per class and metric the
    mean ± sample std over seeds (undefined values, such as HD95 of an empty prediction, left out)."""
    values: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    seeds: dict[tuple[str, str, str], set[str]] = {}
    for row in rows:
        key = (row["size"], row["row"], row["tta"])
        seeds.setdefault(key, set()).add(row["seed"])
        try:
            value = float(row["value"])
        except ValueError:
            value = math.nan
        values.setdefault(key, {}).setdefault(f"{row['class']} {row['metric']}", []).append(value)
    summary = []
    for key, columns in values.items():
        out = {"size": key[0], "row": key[1], "tta": key[2], "seeds": str(len(seeds[key]))}
        for column, column_values in columns.items():
            out[column] = _mean_std([v for v in column_values if math.isfinite(v)])
        summary.append(out)
    return summary


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return _fmt(values[0]) if values else "-"
    return f"{_fmt(statistics.fmean(values))} ± {statistics.stdev(values):.2g}"


# ----------------------------------------------------------------------------------------------- writing

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1160px;
       color: #1d2330; line-height: 1.4; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #d8dde6; padding-bottom: 4px; }
.facts { color: #566074; margin: 0 0 8px; } nav a { margin-right: 14px; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #d8dde6; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { background: #eef1f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #e6f4ea; font-weight: 600; } .note { color: #566074; font-size: 13px; }
img { max-width: 100%; display: block; margin: 6px 0 14px; } details { margin: 8px 0; }
summary { cursor: pointer; font-weight: 600; } code { background: #eef1f6; padding: 0 3px; }
"""


def _page(subject: _Subject, baselines: list[dict[str, str]] | None, baselines_path: Path) -> str:
    e = html.escape
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>augsearch report: {e(subject.title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        f"<h1>augsearch report: {e(subject.title)}</h1>",
        f'<p class="facts">{" &middot; ".join(e(fact) for fact in subject.facts)}</p>',
        '<nav><a href="#comparison">Comparison</a><a href="#validation">Validation curves</a>'
        '<a href="#tra">Learned TRA</a><a href="#tea">TEA weights</a></nav>',
        '<section id="comparison"><h2>Comparison</h2>', _comparison(subject),
    ]
    if baselines is not None:
        parts += [f'<h3>Baselines <span class="note">({e(str(baselines_path))}, test-set metrics of the '
                  f'compared methods; the rows above are validation metrics)</span></h3>', _baselines(baselines)]
    parts += ["</section>", '<section id="validation"><h2>Validation curves</h2>', _validation(subject), "</section>",
              '<section id="tra"><h2>Learned TRA probabilities</h2>', _per_run(subject, _tra), "</section>",
              '<section id="tea"><h2>TEA weights</h2>', _per_run(subject, _tea), "</section>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _img(figure: Any, alt: str) -> str:
    data = base64.b64encode(figures.png_bytes(figure)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _comparison(subject: _Subject) -> str:
    rows = [run.row for run in subject.runs]
    params = sorted({k for row in rows for k in row["params"]})
    others = sorted({k for row in rows for k in row["metrics"] if k.startswith("val/") and k != subject.metric})
    header = ["trial", "status", *params, "epoch", subject.metric, *others, "train/loss"]
    lines = ["<div class=\"scroll\"><table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for run in subject.runs:
        row = run.row
        cells = [row["trial"], row["status"], *(row["params"].get(k) for k in params), row["metrics"].get("epoch"),
                 row["metrics"].get(subject.metric), *(row["metrics"].get(k) for k in others),
                 row["metrics"].get("train/loss")]
        css = ' class="best"' if run.label == subject.best else ""
        lines.append(f"<tr{css}>" + "".join(_cell(_fmt(c)) for c in cells) + "</tr>")
    lines.append("</table></div>")
    if subject.best is not None:
        lines.append(f'<p class="note">Best by {html.escape(subject.metric)} ({subject.mode}), highlighted: '
                     f'{html.escape(subject.best)}; <code>augsearch export</code> picks the same one.</p>')
    return "\n".join(lines)


def _baselines(rows: list[dict[str, str]]) -> str:
    header = list(dict.fromkeys(column for row in rows for column in row))
    lines = ["<div class=\"scroll\"><table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        lines.append("<tr>" + "".join(_cell(_number(row.get(h, ""))) for h in header) + "</tr>")
    lines.append("</table></div>")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A table cell; numbers align right."""
    try:
        float(text)
    except ValueError:
        return f"<td>{html.escape(text)}</td>"
    return f'<td class="num">{html.escape(text)}</td>'


def _number(text: str | None) -> str:
    """A CSV cell: decimals to 4 significant digits, everything else as written."""
    text = text or ""
    try:
        value = float(text)
    except ValueError:
        return text
    return text if text.lstrip("-").isdigit() else _fmt(value)


def _validation(subject: _Subject) -> str:
    histories = {run.label: run.history for run in subject.runs if run.history}
    if not histories:
        return '<p class="note">No epoch has been recorded yet.</p>'
    present = {k for history in histories.values() for record in history for k in record}
    keys = [subject.metric] + sorted(k for k in present if k.startswith("val/dice") and k != subject.metric)
    keys = [k for k in keys if k in present][: CURVE_PANELS - 1] + ["train/loss"]
    return _img(figures.curves(histories, keys), "validation curves per trial")


def _per_run(subject: _Subject, body) -> str:
    """The best run open, the others folded."""
    parts = []
    for run in subject.runs:
        title = f"{run.label}{' (best)' if run.label == subject.best else ''}"
        content = body(run)
        if run.label == subject.best or len(subject.runs) == 1:
            parts.append(f"<h3>{html.escape(title)}</h3>\n{content}")
        else:
            parts.append(f"<details><summary>{html.escape(title)}</summary>\n{content}</details>")
    return "\n".join(parts)


def _tra(run: _Run) -> str:
    if run.policy is None:
        return '<p class="note">No policy: this run trained without augmentation (augment.mode = "none").</p>'
    policy = run.policy
    members = policy.group_label_names()
    groups = ", ".join(f"{g} ({', '.join(members[g])})" for g in policy.group_names)
    parts = [f'<p class="note">{html.escape(policy.summary())}<br>class groups: {html.escape(groups)}; final '
             f"policy at epoch {_fmt(run.row['metrics'].get('epoch'))}.</p>",
             _img(figures.policy_heatmap(policy), f"TRA bin probabilities per class group, {run.label}")]
    if any(k.startswith("policy/") for record in run.history for k in record):
        parts.append(_img(figures.tra_trajectories(run.history, policy.group_names),
                          f"P(op applied) over training per class group, {run.label}"))
    return "\n".join(parts)


def _tea(run: _Run) -> str:
    if run.policy is None:
        return '<p class="note">No policy, so no test-time augmentation was learned.</p>'
    return _img(figures.tea_panels(run.policy, run.history), f"TEA weights, {run.label}")
