"""`augsearch train CONFIG [--out RUN_DIR] [--resume CKPT [--resume-anyway] | --overwrite] [--set key=value ...]`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from augsearch.artifacts.layout import CHECKPOINT_NAME
from augsearch.errors import AugsearchError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment TOML, e.g. experiments/smoke.toml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value with a dotted key, e.g. --set train.epochs=3 (repeatable)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a segmenter in one process: no augmentation, a fixed policy, or a learned TRA/TEA policy"
    )
    add_config_arguments(parser)
    parser.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint.pt or run directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run directory that holds a run, removing its files")
    parser.add_argument("--resume-anyway", action="store_true",
                        help="resume even when the checkpoint's config or dataset differ from this run's")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from augsearch.config import load_config
    from augsearch.train import fit

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out or Path("runs") / cfg.name)
    if args.resume_anyway and not args.resume:
        raise AugsearchError("--resume-anyway only applies together with --resume CKPT")
    try:
        result = fit(cfg, run_dir, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite,
                     resume_anyway=args.resume_anyway)
    except KeyboardInterrupt:
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise
        sets = [arg for item in args.overrides for arg in ("--set", item)]
        again = shlex.join(["augsearch", "train", args.config, *sets, "--out", str(run_dir), "--resume", str(run_dir)])
        raise KeyboardInterrupt(f"continue from the last checkpoint with {again}") from None
    rare = result.metrics.get("val/dice_rare", float("nan"))
    print(f"run directory: {result.run_dir}")
    print(f"checkpoint:    {result.checkpoint_path}")
    if result.policy_path is not None:
        print(f"policy:        {result.policy_path}")
    print(f"validation:    rare-class Dice {rare:.3f}, "
          f"mean foreground Dice {result.metrics.get('val/dice_mean', float('nan')):.3f}")
    return 0
