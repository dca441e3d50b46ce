"""Export a trained segmenter and its policy file side by side, with the policy's provenance filled in.

Sources: a local run dir (`augsearch train`: checkpoint.pt + policy.json) or a search dir (`augsearch search`),
whose best trial is chosen by a validation metric (search.metric unless told otherwise), never a test metric; ties go
to the higher mean foreground validation Dice. Several searches of the same data (for example one shared search per
starting policy) are compared the same way, trial by trial, and the best of all of them is exported.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.artifacts.layout import CHECKPOINT_NAME, MANIFEST_NAME, POLICY_NAME, SUMMARY_JSON
from augsearch.artifacts.output import check_output_dir
from augsearch.atomic import atomic_open
from augsearch.errors import AugsearchError
from augsearch.policy.io import policy_from_dict, save_policy

# Second key when trials tie on the search metric: the mean Dice over the foreground labels on validation.
TIE_BREAK_METRIC = "val/dice_mean"


class ExportError(AugsearchError):
    """A source that is neither a run nor a search directory, or a search with nothing to export."""


def export(source: str | Path, out: str | Path, *, all_trials: bool = False, metric: str | None = None,
           overwrite: bool = False) -> list[Path]:
    """Export from a run or search directory into OUT; returns the directories written (one per exported model).

    OUT must be new or empty unless `overwrite` (files of the same name are then replaced).
    """
    source, out = Path(source), Path(out)
    check_output_dir(out, overwrite=overwrite)
    if (source / MANIFEST_NAME).is_file():
        return export_search(source, out, all_trials=all_trials, metric=metric)
    if (source / CHECKPOINT_NAME).is_file():
        if all_trials or metric:
            raise ExportError(f"{source} is a single training run; --all and --metric apply to search directories")
        export_checkpoint_dir(source, out, {"source": "augsearch train", "run_dir": str(source.resolve())})
        return [out]
    raise ExportError(
        f"{source} is neither a training run (no {CHECKPOINT_NAME}) nor a search (no {MANIFEST_NAME}); pass the "
        f"run directory of `augsearch train` or the --out directory of `augsearch search`"
    )


def finished_search(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, summary rows) of a search that has finished; refused while it is unfinished or interrupted."""
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    summary_path = run_dir / SUMMARY_JSON
    if not summary_path.is_file():
        raise ExportError(f"{run_dir} has no {SUMMARY_JSON}: the search has not finished; finish it with "
                          f"augsearch search --resume {run_dir}")
    summary = json.loads(summary_path.read_text())
    if summary.get("interrupted"):
        raise ExportError(f"the search in {run_dir} was interrupted and its trials are half-trained; finish it with "
                          f"augsearch search --resume {run_dir}")
    return manifest, summary["trials"]


def ranking(manifest: dict[str, Any], metric: str | None) -> tuple[str, str]:
    """(metric, mode) that rank a search's trials: `metric` (a validation metric) or the search's own."""
    metric = metric or manifest["metric"]
    if not metric.startswith("val/"):
        raise ExportError(f"export ranks trials by validation metrics ('val/...'), got {metric!r}; test metrics "
                          f"must not choose the model")
    return metric, manifest["mode"] if metric == manifest["metric"] else metric_mode(metric)


def search_provenance(run_dir: Path, manifest: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    return {"source": "augsearch search", "run_dir": str(run_dir.resolve()), "experiment": manifest["config"]["name"],
            "search_metric": metric, "search_mode": mode}


def export_search(run_dir: Path, out: Path, *, all_trials: bool = False, metric: str | None = None) -> list[Path]:
    """The best trial by a validation metric into OUT, or every trial with a checkpoint into OUT/<trial>/."""
    manifest, rows = finished_search(run_dir)
    metric, mode = ranking(manifest, metric)
    base = search_provenance(run_dir, manifest, metric, mode)
    if all_trials:
        chosen = [row for row in rows if row.get("checkpoint")]
        for row in chosen:  # every name checked before anything is written
            _inside(run_dir, row)
        done = []
        for row in chosen:
            done.append(_export_row(run_dir, row, out / row["trial"], base))
        if not done:
            raise ExportError(f"no trial of {run_dir} wrote a checkpoint; nothing to export")
        return done
    best = best_trial(rows, metric, mode)
    if best is None:
        reported = sorted({k for row in rows for k in row["metrics"] if k.startswith("val/")})
        failed = [row["trial"] for row in rows if row.get("status") == "ERROR"]
        if failed:
            raise ExportError(f"every trial of {run_dir} that reported {metric!r} failed ({', '.join(failed)}); "
                              f"finish them with augsearch search --resume {run_dir}")
        raise ExportError(f"no trial of {run_dir} with a checkpoint reported {metric!r}; reported validation "
                          f"metrics: {', '.join(reported) or 'none'}")
    return [_export_row(run_dir, best, out, {**base, "selection": selection_note(rows, best, metric)})]


def export_best_of(run_dirs: list[Path], out: Path, *, metric: str | None = None, overwrite: bool = False) -> Path:
    """The best trial of several finished searches on the same data into OUT, by one validation metric: the search
    a user keeps when they cannot tell in advance which of its settings (a starting policy, say) fits their data."""
    run_dirs = [Path(d) for d in run_dirs]
    check_output_dir(out, overwrite=overwrite)
    for run_dir in run_dirs:
        if not (run_dir / MANIFEST_NAME).is_file():
            raise ExportError(f"{run_dir} is not a search directory (no {MANIFEST_NAME}); several sources are "
                              f"compared as searches: pass the --out directories of `augsearch search`")
    searches = [(run_dir, *finished_search(run_dir)) for run_dir in run_dirs]
    rankings = {d: ranking(manifest, metric) for d, manifest, _ in searches}
    if len(set(rankings.values())) > 1:
        raise ExportError("the searches rank their trials by different metrics or directions (" + ", ".join(
            f"{d}: {m} ({mode})" for d, (m, mode) in rankings.items()) + "); choose the one to compare them by with "
            "--metric")
    metric, mode = rankings[run_dirs[0]]
    validation = {d: _validation_cases(m) for d, m, _ in searches}
    if any(v != validation[run_dirs[0]] for v in validation.values()):
        raise ExportError("the searches validate on different data, so their validation metrics do not compare: "
                          + "; ".join(f"{d}: {v}" for d, v in validation.items())
                          + ". Compare searches of the same data.root and data.split")
    owner = {id(row): (run_dir, manifest) for run_dir, manifest, rows in searches for row in rows}
    best = best_trial([row for _, _, rows in searches for row in rows], metric, mode)
    if best is None:
        raise ExportError(f"no trial of {', '.join(map(str, run_dirs))} with a checkpoint reported {metric!r}")
    run_dir, manifest = owner[id(best)]
    scores = []
    for other, _, rows in searches:
        top = best_trial(rows, metric, mode)
        scores.append(f"{other}: {top['trial']} {top['metrics'][metric]:.4g}" if top else f"{other}: none")
    note = (f"search {run_dir}, {selection_note([r for _, _, rows in searches for r in rows], best, metric)}; best "
            f"of each search: {'; '.join(scores)}")
    base = {**search_provenance(run_dir, manifest, metric, mode), "selection": note,
            "compared": [str(d.resolve()) for d in run_dirs]}
    return _export_row(run_dir, best, out, base)


def _validation_cases(manifest: dict[str, Any]) -> dict[str, Any]:
    """What decides a search's validation cases: its data folder and split settings."""
    data = manifest["config"]["data"]
    return {"root": data["root"], "split": data.get("split")}


def metric_mode(metric: str) -> str:
    """Losses and distances are minimised, overlaps maximised."""
    return "min" if any(word in metric for word in ("loss", "hd95", "distance")) else "max"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_trial(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The row with the best finite metric among rows with a checkpoint that did not fail (a failed trial stopped
    part way: its metric is a half-trained model's). Ties (common when a rare class is missed by every trial: Dice 0)
    go to the higher mean foreground validation Dice (TIE_BREAK_METRIC), then to the first."""
    scored = [row for row in rows
              if row.get("checkpoint") and row.get("status") != "ERROR" and _finite(row["metrics"].get(metric))]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0

    def key(row: dict[str, Any]) -> tuple[float, float]:
        tie = row["metrics"].get(TIE_BREAK_METRIC)
        return sign * float(row["metrics"][metric]), float(tie) if _finite(tie) else -math.inf

    return max(scored, key=key)


def selection_note(rows: list[dict[str, Any]], best: dict[str, Any], metric: str) -> str:
    """One sentence on why `best` was chosen, naming the tie-break when other trials had the same metric."""
    value = best["metrics"][metric]
    tied = [row["trial"] for row in rows if row is not best and row.get("checkpoint")
            and row["metrics"].get(metric) == value]
    note = f"trial {best['trial']}: best of {len(rows)} by {metric} = {value:.4g}"
    if tied:
        tie = best["metrics"].get(TIE_BREAK_METRIC)
        shown = f"{tie:.4g}" if _finite(tie) else "not reported"
        note += (f"; tied with {', '.join(tied)}, broken by the mean foreground validation Dice "
                 f"({TIE_BREAK_METRIC} = {shown})")
    return note


def _inside(run_dir: Path, row: dict[str, Any]) -> Path:
    """The row's checkpoint folder, refused when its trial or checkpoint name leads out of RUN_DIR.

    summary.json is data from the folder being exported: a crafted one must not read or write elsewhere.
    """
    trial, checkpoint = row.get("trial"), row.get("checkpoint")
    if not isinstance(trial, str) or not trial or trial in (".", "..") or "/" in trial or "\\" in trial:
        raise ExportError(f"{run_dir / SUMMARY_JSON}: trial name {trial!r} is not a plain folder name; this summary "
                          f"was not written by augsearch search")
    if not isinstance(checkpoint, str) or Path(checkpoint).is_absolute():
        raise ExportError(f"{run_dir / SUMMARY_JSON}: checkpoint {checkpoint!r} of trial {trial} is not a path "
                          f"relative to the search folder; this summary was not written by augsearch search")
    root = run_dir.resolve()
    resolved = (root / checkpoint).resolve()  # follows symbolic links
    if not resolved.is_relative_to(root):
        raise ExportError(f"{run_dir / SUMMARY_JSON}: checkpoint {checkpoint!r} of trial {trial} leads out of "
                          f"{root} (to {resolved}); refusing to export it")
    return resolved


def _export_row(run_dir: Path, row: dict[str, Any], out: Path, base: dict[str, Any]) -> Path:
    provenance = {**base, "trial": row["trial"], "params": row["params"], "status": row["status"],
                  "metrics": {k: v for k, v in row["metrics"].items() if k.startswith("val/") or k == "epoch"}}
    export_checkpoint_dir(_inside(run_dir, row), out, provenance)
    return out



def export_checkpoint_dir(src: Path, out: Path, provenance: dict[str, Any]) -> None:
    """Copy SRC/checkpoint.pt to OUT and re-save SRC/policy.json there with provenance (both atomic)."""

    ckpt = load_checkpoint(src / CHECKPOINT_NAME)
    export = {**provenance, "epoch": ckpt.epoch, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if ckpt.policy is None:
        raise ExportError(f"{src / CHECKPOINT_NAME} holds no policy; export needs one (a run with "
                          f"augment.mode='none' has no policy to export)")
    # The checkpoint's own copy of the policy: policy.json beside it may be a step ahead after a kill.
    policy = policy_from_dict(ckpt.policy, source=f"policy stored in {ckpt.path}")
    # The run's own provenance (config hash, seed, data fingerprint, versions, validation metrics) stays; the
    # export adds where it came from.
    training = ckpt.policy.get("provenance") or {}
    out.mkdir(parents=True, exist_ok=True)
    with open(src / CHECKPOINT_NAME, "rb") as source, atomic_open(out / CHECKPOINT_NAME, "wb") as target:
        shutil.copyfileobj(source, target)
    save_policy(policy, out / POLICY_NAME, provenance={**training, "export": export})
