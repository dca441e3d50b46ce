"""`augsearch calibrate RUN_OR_EXPORT_DIR`: fit the label-free Dice estimators on the run's validation cases."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="fit Dice estimators on the run's validation cases into estimator.json beside the checkpoint",
        description="Predict the run's validation cases (with the same --policy/--top-k/--aggregate as later "
        "`augsearch predict`), fit every estimator (AC, TS, VS, DoC, ATC, TS-ATC and the class-specific CS-*) and "
        "write estimator.json next to checkpoint.pt; `augsearch predict` then writes quality.csv.",
    )
    parser.add_argument("model", metavar="RUN_OR_EXPORT_DIR", help="a run or export folder, or its checkpoint.pt")
    parser.add_argument("--dataset", default=None, help="training dataset folder (default: the checkpoint's data.root)")
    parser.add_argument("--policy", default=None, help="policy file or preset for TTA (as for predict); omitted: none")
    parser.add_argument("--top-k", type=int, default=None, help="number of TEA views (default: the policy's)")
    parser.add_argument("--aggregate", choices=("probabilities", "logits"), default="probabilities")
    parser.add_argument("--default", default="CS-ATC", help="estimator predict reports (default CS-ATC)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per model call")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing estimator.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from augsearch.predict.calibration import fit_from_checkpoint

    path = fit_from_checkpoint(
        args.model, dataset=args.dataset, policy=args.policy, top_k=args.top_k, aggregate=args.aggregate,
        default=args.default, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    return 0
