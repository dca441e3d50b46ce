"""`augsearch export RUN_DIR [SEARCH ...] --out DIR`: the segmenter checkpoint and its policy file, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="copy checkpoint.pt + policy.json (with provenance) from a run or the best trial of a search",
        description="RUN_DIR is an `augsearch train` run or an `augsearch search` directory. For a search, the best "
        "trial by a validation metric is exported to DIR, or every trial to DIR/<trial>/ with --all. Several search "
        "directories of the same data (say one shared search per starting policy) are compared by one validation "
        "metric and the best trial of all of them is exported.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", required=True, metavar="DIR", help="where checkpoint.pt and policy.json go")
    parser.add_argument("--all", dest="all_trials", action="store_true", help="every trial, into DIR/<trial>/")
    parser.add_argument("--metric", help="validation metric that picks the best trial (default: search.metric)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an --out that holds some")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from augsearch.policy.io import read_policy_document
    from augsearch.tune.export import ExportError, export, export_best_of

    if len(args.run_dirs) > 1:
        if args.all_trials:
            raise ExportError("--all exports every trial of one search; pass one search directory, or drop --all to "
                              "export the best trial of several")
        paths = [export_best_of(args.run_dirs, Path(args.out), metric=args.metric,
                                overwrite=args.overwrite)]
    else:
        paths = export(Path(args.run_dirs[0]), Path(args.out), all_trials=args.all_trials, metric=args.metric,
                       overwrite=args.overwrite)
    for path in paths:
        print(f"exported {path / 'checkpoint.pt'} and {path / 'policy.json'}")
        selection = (read_policy_document(path / "policy.json").get("provenance") or {}).get("export", {})
        if selection.get("selection"):
            print(f"  {selection['selection']}")
    return 0
