"""`augsearch predict`: segment NIfTI volumes with a trained checkpoint and test-time augmentation from a policy."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment NIfTI volumes with a checkpoint and a TTA policy",
        description="Segment each case under --input (a NIfTI file or an imagesTs-style folder) into "
        "--output/<case>.nii.gz (.nii for .nii input), averaging the views of the policy's selected test-time "
        "transforms.",
    )
    parser.add_argument("--model", required=True, help="checkpoint.pt written by `augsearch train`, or its run folder")
    parser.add_argument("--policy", default=None,
                        help="policy JSON file or preset name (flips-tta, identity, ...) whose TEA entries to use; "
                        "omitted: no TTA (plain sliding window)")
    parser.add_argument("--input", required=True, help="a NIfTI file, or a folder of them (<case>_0000.nii.gz ...)")
    parser.add_argument("--output", required=True, help="folder for <case>.nii.gz, or <case>.nii for .nii input "
                        "(created; must be new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --output folder that holds files, replacing those of the same name")
    parser.add_argument("--cases", nargs="+", default=None, metavar="ID", help="predict only these case ids")
    parser.add_argument("--top-k", type=int, default=None, help="number of TEA views (default: the policy's)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per model call, all views together")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--aggregate", choices=("probabilities", "logits"), default="probabilities",
                        help="average the views' probabilities (default) or their logits")
    parser.add_argument("--uncertainty", action="store_true",
                        help="also write <case>_entropy.nii.gz, <case>_variance.nii.gz and uncertainty.csv into "
                        "OUTPUT/uncertainty/ (OUTPUT keeps the segmentations only, for augsearch evaluate)")
    parser.add_argument("--min-component-mm3", type=float, default=0.0, metavar="MM3",
                        help="remove predicted connected components smaller than this volume (default 0: keep all)")
    parser.add_argument("--keep-largest", nargs="+", default=(), metavar="CLASS",
                        help="keep only the largest connected component of these classes (names or values)")
    parser.add_argument("--estimate", default=None, metavar="ESTIMATOR",
                        help="estimator for quality.csv (estimated Dice per class and case), e.g. CS-ATC; default: "
                        "the one chosen by `augsearch calibrate` when the model folder has estimator.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from augsearch.atomic import check_writable
    from augsearch.predict.files import predict_files

    check_writable(args.output, folder=True)
    written = predict_files(
        args.model, args.input, args.output, policy=args.policy, cases=args.cases, top_k=args.top_k,
        batch_size=args.batch_size, device=args.device, overlap=args.overlap, aggregate=args.aggregate,
        uncertainty=args.uncertainty, min_component_mm3=args.min_component_mm3,
        keep_largest=args.keep_largest, estimate=args.estimate, overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} file(s) to {args.output}")
    return 0
