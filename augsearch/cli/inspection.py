"""`augsearch inspect logits --model CKPT --dataset DIR [--split S] [--compare-split train] --out PNG [--json OUT]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from augsearch.errors import AugsearchError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="diagnostics of trained segmenters")
    sub = parser.add_subparsers(dest="inspect_command", required=True, metavar="WHAT")
    logits = sub.add_parser(
        "logits",
        help="per-class true-class logit margins on training vs unseen cases (overfitting under class imbalance)",
        description="Predict whole volumes of the reference split (default: the cases the checkpoint trained on) "
        "and of an unseen split, and plot per class the density of the margin z_y - max_{c!=y} z_c. Unseen "
        "rare-class voxels drifting towards or across 0 while the frequent classes stay put is the signature "
        "of overfitting under class imbalance.",
    )
    logits.add_argument("--model", required=True, metavar="CKPT", help="checkpoint.pt or its run directory")
    logits.add_argument("--dataset", metavar="DIR", help="dataset root (default: the checkpoint's data.root)")
    logits.add_argument("--split", metavar="SPLIT",
                        help="unseen split: train, val or test (default: test when it has cases, else val)")
    logits.add_argument("--compare-split", default="train", metavar="SPLIT",
                        help="reference split (default train: the cases the checkpoint trained on)")
    logits.add_argument("--out", required=True, metavar="PNG", help="figure to write")
    logits.add_argument("--json", metavar="OUT", help="also write summary statistics per class as JSON")
    logits.add_argument("--max-voxels", type=int, default=20000, metavar="N",
                        help="uniform voxel subsample per class and split (default 20000)")
    logits.add_argument("--seed", type=int, default=0, help="seed of the voxel subsample")
    logits.add_argument("--device", default="cpu", help="torch device for prediction (default cpu)")
    logits.add_argument("--batch-size", type=int, default=8, help="sliding-window batch size")
    logits.set_defaults(func=run_logits)


def run_logits(args: argparse.Namespace) -> int:
    import torch

    from augsearch.artifacts.checkpoint import load_checkpoint
    from augsearch.atomic import write_json
    from augsearch.predict.logit_margins import (
        SPLITS,
        checkpoint_margins,
        margin_report,
        plot_margins,
    )

    for flag, value in (("--split", args.split), ("--compare-split", args.compare_split)):
        if value is not None and value not in SPLITS:
            raise AugsearchError(f"{flag} must be one of {', '.join(SPLITS)}, got {value!r}")
    if args.max_voxels < 1:
        raise AugsearchError(f"--max-voxels must be a positive number of voxels, got {args.max_voxels}")
    if not Path(args.out).suffix.lower() == ".png":
        raise AugsearchError(f"--out must name a .png file, got {args.out!r}")
    ckpt = load_checkpoint(args.model)
    dataset = args.dataset or ckpt.config["data"]["root"]
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise AugsearchError(f"--device must be a torch device such as cpu or cuda:0, got {args.device!r}") from None
    margins = checkpoint_margins(ckpt, dataset, split=args.split, compare_split=args.compare_split,
                                 max_voxels=args.max_voxels, seed=args.seed, batch_size=args.batch_size,
                                 device=device)
    plot_margins(margins["train"], margins["unseen"], args.out, class_names=margins["class_names"],
                 labels=(margins["compare_split"], margins["split"]),
                 title=f"{Path(args.model)}: {margins['compare_split']} vs {margins['split']}")
    report = margin_report(margins, checkpoint=str(args.model), dataset=str(dataset), max_voxels=args.max_voxels,
                           seed=args.seed)
    if args.json:
        write_json(args.json, report)
    print(f"{'class':<12} {'mean ' + margins['compare_split']:>12} {'mean ' + margins['split']:>12} {'shift':>8} "
          f"{'<0 ' + margins['compare_split']:>10} {'<0 ' + margins['split']:>10}")
    for name, row in report["classes"].items():
        cells = [row["train_mean"], row["unseen_mean"], row["mean_shift"], row["train_frac_across"],
                 row["unseen_frac_across"]]
        text = ["nan" if v is None else f"{v:.3f}" for v in cells]
        print(f"{name:<12} {text[0]:>12} {text[1]:>12} {text[2]:>8} {text[3]:>10} {text[4]:>10}")
    print(f"figure: {args.out}" + (f"\nstatistics: {args.json}" if args.json else ""))
    return 0
