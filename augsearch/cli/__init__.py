"""`augsearch` command line: one module per subcommand group, imported only when its command runs."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import threading

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


def _stop_like_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM runs the current SIGINT handler: Tune saves its state and stops, train ends with a resume hint."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse's parse_args, with a hint where the unrecognised arguments are overrides missing their own --set."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        if hasattr(args, "overrides") and all("=" in arg and not arg.startswith("-") for arg in unknown):
            message += "; each KEY=VALUE needs its own --set: " + " ".join(f"--set {arg}" for arg in unknown)
        parser.exit(2, f"{parser.prog} {args.command}: error: {message}\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except AugsearchError as err:
        print(f"augsearch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output left (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush raises nothing
        return 128 + signal.SIGPIPE
    except OSError as err:  # a path the user gave: missing, not writable, a file where a folder belongs
        print(f"augsearch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a command may say how to continue: KeyboardInterrupt("resume with ...")
        hint = f"; {err}" if str(err) else ""
        print(f"augsearch {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
