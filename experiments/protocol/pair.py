"""Paired per-seed comparison of two rows that may sit in different results folders (a variant run beside a table).

    python experiments/protocol/pair.py A B [--column none|flips|learned] [--column-b ...] [--label NAME ...]

A and B are run folders of per-seed JSON files written by run.py, e.g.
`experiments/bundled_fg_gamma_up/results_w4_lr0125/train6/shared` and `experiments/bundled_fg_gamma_up/results/train6/
shared`. Prints each side's test Dice (mean +- std over seeds, %; averaged over --label, by default the labels the
experiment's tables pair on, its experiment.json `paired`, else every label) and the paired difference A - B over the
seeds both have: mean, 95% percentile bootstrap interval (10,000 resamples of seeds, the same as run.py's tables)
and the seeds where A wins.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Experiment, bootstrap_ci, mean_std  # noqa: E402 (this folder is not a package)


def dice_by_seed(folder: Path, column: str, labels: list[str] | None) -> dict[int, float]:
    """seed -> test Dice (%) in TTA `column`, averaged over `labels` (None: the experiment's paired labels), over the
    folder's seed<k>.json files."""
    found = {}
    paired = labels or paired_labels(folder)
    for path in folder.glob("seed*.json"):
        match = re.fullmatch(r"seed(\d+)\.json", path.name)
        if match:
            scores = json.loads(path.read_text())["test"][column]
            names = paired or list(scores)
            missing = [name for name in names if name not in scores]
            if missing:
                raise SystemExit(f"{path}: expected labels {missing} in its test scores, found {list(scores)}; "
                                 "pass --label with some of these")
            found[int(match.group(1))] = 100 * sum(scores[name]["dice"] for name in names) / len(names)
    if not found:
        raise SystemExit(f"{folder}: expected seed<k>.json files written by experiments/protocol/run.py, found none")
    return found


def paired_labels(folder: Path) -> list[str] | None:
    """The paired labels of the experiment above a results folder (EXPERIMENT/RESULTS/train<N>/<row>); None where
    the folder is not inside an experiment (then every label a run scored)."""
    parents = folder.resolve().parents
    if len(parents) > 2 and (parents[2] / "experiment.json").is_file():
        return list(Experiment.load(parents[2]).paired)
    return None


def summary(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f} +- {std:.1f} (n={len(values)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--column", default="none", choices=["none", "flips", "learned"], help="TTA column of A")
    parser.add_argument("--column-b", choices=["none", "flips", "learned"], help="TTA column of B (default: A's)")
    parser.add_argument("--label", nargs="+", default=None, metavar="NAME",
                        help="labels whose mean Dice is compared (default: the experiment's paired labels)")
    args = parser.parse_args(argv)
    a = dice_by_seed(args.a, args.column, args.label)
    b = dice_by_seed(args.b, args.column_b or args.column, args.label)
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    print(f"A {args.a} [{args.column}]: {summary(list(a.values()))}")
    print(f"B {args.b} [{args.column_b or args.column}]: {summary(list(b.values()))}")
    if not diffs:
        raise SystemExit("no seed in common: nothing to pair")
    low, high = bootstrap_ci(diffs)
    print(f"A - B over seeds {seeds}: {sum(diffs) / len(diffs):+.1f} [{low:+.1f}, {high:+.1f}], "
          f"A wins {sum(d > 0 for d in diffs)}/{len(diffs)}")


if __name__ == "__main__":
    main()
