"""`augsearch evaluate --pred DIR [--pred DIR2 ...] --gt DIR [--labels dataset.json] [--out CSV]`."""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

from augsearch.errors import AugsearchError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Dice, sensitivity, precision, HD95 (mm) and lesion-wise detection of predicted NIfTI label folders",
        description="Compare one or more prediction folders with a ground-truth folder (files matched by name); "
        "several --pred folders are summarised side by side. A prediction folder with quality.csv (from a calibrated "
        "model) adds estimated_dice and abs_error columns and their mean absolute error per class.",
    )
    parser.add_argument("--pred", action="append", required=True, metavar="DIR", help="prediction folder (repeatable)")
    parser.add_argument("--gt", required=True, metavar="DIR", help="ground-truth label folder")
    parser.add_argument("--labels", metavar="JSON", help="dataset.json naming the labels (default: label numbers)")
    parser.add_argument("--out", metavar="CSV", help="write per-case rows to this CSV file")
    parser.add_argument("--lesion-dilation", type=int, default=1, metavar="VOXELS",
                        help="a ground-truth lesion is detected by a predicted component touching it dilated by this "
                        "many voxels (default 1)")
    parser.add_argument("--min-lesion-mm3", type=float, default=0.0, metavar="MM3",
                        help="ignore ground-truth lesions smaller than this volume in lesion-wise metrics (default 0)")
    parser.add_argument("--predicted-only", action="store_true",
                        help="compare only the cases the prediction folders hold; the ground-truth folder may hold "
                        "more (e.g. labelsTr when the test split was predicted); every --pred folder must then hold "
                        "the same cases")
    parser.set_defaults(func=run)


def _names(pred_dirs: list[str]) -> list[str]:
    """Each prediction folder named by its folder name, or by its path when two share a name."""
    names = [Path(p).name or str(p) for p in pred_dirs]
    if len(set(names)) < len(names):
        names = [str(p) for p in pred_dirs]
    if len(set(names)) < len(names):
        raise AugsearchError(f"--pred folders must differ, got {pred_dirs}")
    return names


def _same_cases(cases: dict[str, set[str]]) -> None:
    """Refuse prediction folders (name -> case names) that cover different cases: their columns would not be
    comparable."""
    first, *others = cases
    for name in others:
        if cases[name] != cases[first]:
            raise AugsearchError(
                f"--pred folders {first} and {name} hold different cases (only in {first}: "
                f"{sorted(cases[first] - cases[name]) or 'none'}; only in {name}: "
                f"{sorted(cases[name] - cases[first]) or 'none'}); predict the same cases into each folder"
            )


def _cell(stats: dict) -> str:
    if math.isnan(stats["mean"]):
        text = "nan"
    else:
        text = f"{stats['mean']:.4f} ± {stats['std']:.4f}"
    return text + (f" ({stats['nan']} NaN)" if stats["nan"] else "")


def summary_table(summaries: dict[str, dict]) -> str:
    """Rows class x metric, one column per prediction folder."""
    from augsearch.metrics import METRICS

    names = list(summaries)
    classes = list(dict.fromkeys(c for summary in summaries.values() for c in summary))
    header = ["class", "metric", *names]
    body = [
        [cls, metric, *(_cell(summaries[n][cls][metric]) if cls in summaries[n] else "-" for n in names)]
        for cls in classes
        for metric in METRICS
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from augsearch.artifacts.layout import QUALITY_CSV
    from augsearch.atomic import write_text
    from augsearch.metrics import METRICS, evaluate_pairs, matched_cases, read_label_names
    from augsearch.predict.calibration import attach_estimates

    label_names = read_label_names(args.labels) if args.labels else None
    names = _names(args.pred)
    rows, summaries = [], {}
    pairs = {name: matched_cases(pred_dir, args.gt, predicted_only=args.predicted_only)
             for name, pred_dir in zip(names, args.pred, strict=True)}
    _same_cases({name: set(cases) for name, cases in pairs.items()})  # before any volume is read
    for name, pred_dir in zip(names, args.pred, strict=True):
        pred_rows, summaries[name] = evaluate_pairs(pairs[name], label_names, lesion_dilation=args.lesion_dilation,
                                                    min_lesion_mm3=args.min_lesion_mm3)
        if (Path(pred_dir) / QUALITY_CSV).is_file():
            attach_estimates(pred_rows, Path(pred_dir) / QUALITY_CSV)
        rows.extend({"prediction": name, **row} for row in pred_rows)
    print(summary_table(summaries))
    estimated = [row for row in rows if row.get("abs_error") is not None and not math.isnan(row["abs_error"])]
    for key in dict.fromkeys((row["prediction"], row["class"]) for row in estimated):
        errors = [row["abs_error"] for row in estimated if (row["prediction"], row["class"]) == key]
        print(f"estimated Dice {key[0]} {key[1]}: mean absolute error {sum(errors) / len(errors):.4f} "
              f"over {len(errors)} case(s)")
    if args.out:
        buffer = io.StringIO()
        extra = ("estimated_dice", "abs_error") if any("estimated_dice" in row for row in rows) else ()
        writer = csv.DictWriter(buffer, fieldnames=("prediction", "case", "class", *METRICS, *extra),
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(args.out, buffer.getvalue())
        print(f"per-case rows: {args.out}")
    return 0
