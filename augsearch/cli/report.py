"""`augsearch report RUN_DIR`: a static HTML page about a search or a training run."""

from __future__ import annotations

import argparse
from pathlib import Path

REPORT_NAME = "report.html"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML page: comparison table, validation curves, learned TRA and TEA",
        description="RUN_DIR is a search folder (augsearch search / submit) or a training run (augsearch train). "
        "The page inlines its figures, so it can be mailed or opened anywhere; it works on a search that is "
        "still running (rows from each trial's metrics so far).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--out", metavar="FILE", help=f"the HTML file (default RUN_DIR/{REPORT_NAME})")
    parser.add_argument("--baselines", metavar="CSV",
                        help="a results.csv with baseline rows to show beside the trials (default RUN_DIR/results.csv "
                        "when present), e.g. experiments/comparison/results.csv; an evidence table's results.csv "
                        "(experiments/hippocampus/results/results.csv) is shown as mean ± std over its seeds")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from augsearch.service.report import write_report

    out = Path(args.out) if args.out else Path(args.run_dir) / REPORT_NAME
    print(f"wrote {write_report(Path(args.run_dir), out, args.baselines)}")
    return 0
