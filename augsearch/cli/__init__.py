"""`augsearch` command line: one module per subcommand group, imported only when its command runs."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from augsearch.errors import AugsearchError


def _command_modules() -> list[str]:
    """Every module in this package is one subcommand group with `register(subparsers)`."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="augsearch",
        description="Learn class-specific training-time and test-time augmentation policies for segmentation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _command_modules():
        module = importlib.import_module(f"augsearch.cli.{module_name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AugsearchError as err:
        print(f"augsearch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"augsearch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"augsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
