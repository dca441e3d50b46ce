"""`augsearch data synth ...` (write the phantom benchmark) and `augsearch data check DIR` (integrity check)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="generate the benchmark dataset or check a dataset")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = sub.add_parser("synth", help="write the class-imbalanced phantom benchmark (nnU-Net raw layout)")
    synth.add_argument("--out", required=True, help="new or empty folder to write")
    synth.add_argument("--dims", type=int, choices=(2, 3), required=True)
    synth.add_argument("--cases", type=int, default=24, help="total cases: train + val + test (default 24)")
    synth.add_argument("--train-cases", type=int, default=6, help="training cases (default 6)")
    synth.add_argument("--size", type=int, default=None, help="edge length in voxels (default 96 in 2D, 48 in 3D)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shift", default=None,
                       help="planted train vs val/test difference: flip_x, rot90_xy, gamma_up, gamma_down, "
                            "fg_gamma_up (gamma_up only around the labelled structures)")
    synth.set_defaults(func=_synth)

    check = sub.add_parser("check", help="report every integrity problem of a dataset; exit 1 when any")
    check.add_argument("root", help="dataset folder holding dataset.json")
    check.set_defaults(func=_check)


def _synth(args: argparse.Namespace) -> int:
    from augsearch.data.synthetic import write_benchmark

    out = write_benchmark(args.out, dims=args.dims, cases=args.cases, train_cases=args.train_cases, size=args.size,
                          seed=args.seed, shift=args.shift)
    print(f"wrote {args.cases} cases ({args.train_cases} train) to {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from augsearch.data.check import check_dataset, format_report

    problems = check_dataset(args.root)
    print(format_report(args.root, problems))
    return 1 if problems else 0
