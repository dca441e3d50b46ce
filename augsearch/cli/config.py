"""`augsearch config show [CONFIG] [--set ...]`: the full, validated configuration with every default filled in."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="show the validated configuration (defaults filled in)")
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the configuration as JSON; without CONFIG, the defaults")
    show.add_argument("config", nargs="?", default=None)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from augsearch.config import apply_overrides, config_from_dict, load_config

    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = config_from_dict(apply_overrides({}, args.overrides), source="defaults")
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0
