"""`augsearch search CONFIG`: run the trials of [search.space] on Ray Tune (or in-process with --no-ray)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from augsearch.artifacts.layout import MANIFEST_NAME
from augsearch.errors import AugsearchError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search over [search.space]: one training run per trial on Ray Tune",
        description="Each trial is one `fit` of CONFIG with the values of [search.space] set. Without --address a "
        "local Ray starts on 127.0.0.1 with this machine's resources and stops at the end.",
    )
    parser.add_argument("config", nargs="?", help="experiment TOML (not needed with --resume)")
    parser.add_argument("--address", help="join this Ray cluster (host:port of the head, see workers/README.md)")
    add_search_options(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted search in RUN_DIR")
    parser.add_argument("--out", metavar="RUN_DIR", help="new search directory (default runs/<name>-search-<time>)")
    parser.add_argument("--no-ray", action="store_true", help="run the trials one after another in this process")
    parser.set_defaults(func=run)


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """The options that change the search's config (shared with `augsearch submit`)."""
    parser.add_argument("--num-samples", type=int, help="repeats of every point of the space, with seeds seed, "
                        "seed + 1, ... unless the space sets seed (search.num_samples)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions share a GPU")
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial; also the trial's torch threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable, e.g. --set train.epochs=2")


def search_overrides(args: argparse.Namespace) -> list[str]:
    """--set values, then the search options as search.* overrides."""
    overrides = list(args.overrides)
    for flag in ("num_samples", "gpus_per_trial", "cpus_per_trial"):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"search.{flag}={value}")
    return overrides


def run(args: argparse.Namespace) -> int:
    from augsearch.config import load_config
    from augsearch.tune.search import new_search, resume_search

    if args.resume:
        if args.config or args.overrides or args.out or args.no_ray:
            print("augsearch search: --resume continues with the search's own config and backend; "
                  "CONFIG, --set, --out and --no-ray are ignored", file=sys.stderr)
        run_dir = Path(args.resume)
        try:
            result = resume_search(run_dir, address=args.address)
        except KeyboardInterrupt:
            return _interrupted(run_dir)
    else:
        if not args.config:
            raise AugsearchError("augsearch search needs CONFIG (an experiment TOML) or --resume RUN_DIR")
        cfg = load_config(args.config, search_overrides(args))
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-search-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            result = new_search(cfg, out, address=args.address, use_ray=not args.no_ray)
        except KeyboardInterrupt:
            return _interrupted(out)
    if result.interrupted:
        return _interrupted(result.run_dir)
    if result.failed:
        names = ", ".join(row["trial"] for row in result.failed)
        print(f"augsearch search: {len(result.failed)} trial(s) failed ({names}); finish them with "
              f"augsearch search --resume {result.run_dir}", file=sys.stderr)
        return 1
    return 0


def _interrupted(run_dir: Path) -> int:
    """Exit status 130 (interrupted), and how to go on; nothing of a half-finished search is offered for export."""
    if (run_dir / MANIFEST_NAME).is_file():
        print(f"augsearch search: interrupted; resume with augsearch search --resume {run_dir}", file=sys.stderr)
    else:
        print("augsearch search: interrupted before the search started; nothing was written", file=sys.stderr)
    return 130
