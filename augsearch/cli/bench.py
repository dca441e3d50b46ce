"""`augsearch bench NAME [--device cpu|cuda] [--json OUT]`: one subcommand per module in augsearch.bench."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil

import augsearch.bench


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure speed and memory (JSON results)")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for info in sorted(pkgutil.iter_modules(augsearch.bench.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"augsearch.bench.{info.name}")
        bench = sub.add_parser(info.name, help=(module.__doc__ or "").strip().splitlines()[0])
        bench.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
        bench.add_argument("--json", dest="json_out", default=None, help="write the results to this JSON file")
        module.add_arguments(bench)
        bench.set_defaults(func=lambda args, module=module: _run(module, args))


def _run(module, args: argparse.Namespace) -> int:
    from augsearch.atomic import check_writable, write_json

    if args.json_out:
        check_writable(args.json_out)  # before the measurements, not after
    results = module.run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        write_json(args.json_out, results)
    return 0
