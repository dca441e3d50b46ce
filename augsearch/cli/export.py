"""`augsearch export RUN_DIR --out DIR`: the segmenter checkpoint and its policy file, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="copy checkpoint.pt + policy.json (with provenance) from a run or the best trial of a search",
        description="RUN_DIR is an `augsearch train` run or an `augsearch search` directory. For a search, the best "
        "trial by a validation metric is exported to DIR, or every trial to DIR/<trial>/ with --all.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--out", required=True, metavar="DIR", help="where checkpoint.pt and policy.json go")
    parser.add_argument("--all", dest="all_trials", action="store_true", help="every trial, into DIR/<trial>/")
    parser.add_argument("--metric", help="validation metric that picks the best trial (default: search.metric)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an --out that holds some")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from augsearch.policy.io import read_policy_document
    from augsearch.tune.export import export

    for path in export(Path(args.run_dir), Path(args.out), all_trials=args.all_trials, metric=args.metric,
                       overwrite=args.overwrite):
        print(f"exported {path / 'checkpoint.pt'} and {path / 'policy.json'}")
        selection = (read_policy_document(path / "policy.json").get("provenance") or {}).get("export", {})
        if selection.get("selection"):
            print(f"  {selection['selection']}")
    return 0
