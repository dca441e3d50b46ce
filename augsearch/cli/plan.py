"""`augsearch plan DATASET [--device cpu|cuda] [--memory GB] [--out CONFIG] [--mode ...]`: a commented config planned
from the dataset's fingerprint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="write a complete, commented config planned from a dataset's fingerprint (spacing, shapes, classes)",
    )
    parser.add_argument("dataset", help="dataset folder holding dataset.json, imagesTr/ and labelsTr/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda",
                        help="where the search runs (default cuda)")
    parser.add_argument("--memory", type=float, default=None, metavar="GB",
                        help="device memory to plan for (default 8 on cuda, 4 on cpu)")
    parser.add_argument("--mode", choices=("joint", "tra", "tea", "none"), default="joint",
                        help="what the run learns: TRA and TEA (joint), one of them, or plain training (none)")
    parser.add_argument("--out", default=None, metavar="CONFIG.toml", help="write here (default: print)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from augsearch.atomic import write_text
    from augsearch.data.plan import fingerprint, make_plan, plan_toml
    from augsearch.errors import AugsearchError

    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise AugsearchError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    plan = make_plan(fingerprint(args.dataset), device=args.device, memory_gb=args.memory, mode=args.mode)
    text = plan_toml(plan, args.dataset)
    if out is None:
        print(text, end="")
        return 0
    write_text(out, text)
    print(f"wrote {out}: patch {plan.patch_size}, batch {plan.batch_size}, spacing {plan.target_spacing}, "
          f"{plan.epochs} x {plan.iterations} iterations "
          f"(about {plan.epochs * plan.iterations * plan.ms_per_iteration / 60000:.0f} "
          f"min on {plan.device})")
    return 0
