"""`augsearch data synth ...` (write the phantom benchmark), `augsearch data check DIR` (integrity check) and
`augsearch data split DIR_OR_CONFIG` (the case ids training, validation and test use)."""

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

    split = sub.add_parser("split", help="the training, validation and test case ids a run uses",
                           description="Print the split a run uses: of a dataset folder with the data.split "
                           "defaults, or of a config (its data.root and data.split, after --set). With --part, only "
                           "that part's ids, one per line, e.g. for `augsearch predict --cases $(augsearch data "
                           "split CONFIG --part test)`.")
    split.add_argument("target", metavar="DATASET_OR_CONFIG", help="dataset folder holding dataset.json, or a "
                       "config .toml")
    split.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override (with a config), e.g. data.split.fold=1")
    split.add_argument("--part", choices=("train", "val", "test"), help="print only these case ids")
    split.set_defaults(func=_split)


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


def _split(args: argparse.Namespace) -> int:
    from pathlib import Path

    from augsearch.config import SplitConfig, load_config
    from augsearch.data.dataset import read_dataset_info
    from augsearch.data.splits import resolve_splits
    from augsearch.errors import AugsearchError

    if Path(args.target).is_dir():
        if args.overrides:
            raise AugsearchError(f"--set needs a config; {args.target} is a dataset folder. Pass the config .toml "
                                 "instead, or leave out --set to see the data.split defaults")
        root, split_cfg = args.target, SplitConfig()
    else:
        cfg = load_config(args.target, args.overrides)
        root, split_cfg = cfg.data.root, cfg.data.split
    splits = resolve_splits(read_dataset_info(root), split_cfg)
    if args.part:
        ids = getattr(splits, args.part)
        if not ids:
            raise AugsearchError(f"the split of {root} ({splits.describe()}) has no {args.part} cases; name them in "
                                 f"data.split.{args.part} or in a splits file")
        print("\n".join(ids))
        return 0
    print(f"{root}: {splits.describe()}")
    folders = {"train": "imagesTr", "val": "imagesTr", "test": "imagesTs" if splits.test_split == "Ts" else "imagesTr"}
    for part, folder in folders.items():
        ids = getattr(splits, part)
        print(f"{part} ({len(ids)}, in {folder}/): {' '.join(ids) or '-'}")
    return 0
