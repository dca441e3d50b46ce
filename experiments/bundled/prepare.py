"""Write the bundled 2D benchmark for the evidence protocol: 12 training, 30 validation and 30 test phantoms.

    python experiments/bundled/prepare.py [--out runs/data/bundled]
    python experiments/bundled/prepare.py --shift fg_gamma_up --size 128 --out runs/data/bundled_fg_gamma_up

`augsearch data synth --dims 2 --cases 72 --train-cases 12 --seed 0` writes the phantoms (the bundled benchmark's
generator and distributions: training cases narrow, validation and test cases wide; experiments/README.md, "The
bundled benchmark"); beside them this script writes `splits_final.json` in nnU-Net's form, fold 0 the first 6
training cases and fold 1 all 12 (nested), both with the same 30 validation cases, and checks that the generator's
test cases are the committed `test_cases.json`. It ends with `augsearch data check`. Same arguments, same bytes, so
every machine builds the same benchmark; nothing is written into the repository. `--shift` and `--size` pass a planted
shift and the edge length to the generator (the class-specific variant, experiments/bundled_fg_gamma_up/); the case
names and splits stay the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from augsearch.atomic import write_json
from augsearch.data.synthetic import benchmark_split

HERE = Path(__file__).resolve().parent
CASES, TRAIN_CASES, SEED, SMALL = 72, 12, 0, 6
TEST_CASES = HERE / "test_cases.json"


def splits() -> tuple[list[dict[str, list[str]]], list[str]]:
    """The two nested folds (6 and 12 training cases, the same validation cases) and the test cases."""
    split = benchmark_split(CASES, TRAIN_CASES)
    folds = [{"train": split["train"][:SMALL], "val": split["val"]}, {"train": split["train"], "val": split["val"]}]
    return folds, split["test"]


def prepare(out: Path, shift: str | None = None, size: int | None = None) -> int:
    folds, test = splits()
    committed = json.loads(TEST_CASES.read_text())
    if test != committed:
        print(f"error: the generator's test cases differ from {TEST_CASES}; the benchmark's arguments changed",
              file=sys.stderr)
        return 1
    if not (out / "dataset.json").is_file():
        variant = [*(["--shift", shift] if shift else []), *(["--size", str(size)] if size else [])]
        done = subprocess.run([sys.executable, "-m", "augsearch", "data", "synth", "--out", str(out), "--dims", "2",
                               "--cases", str(CASES), "--train-cases", str(TRAIN_CASES), "--seed", str(SEED),
                               *variant], check=False)
        if done.returncode != 0:
            return done.returncode
    write_json(out / "splits_final.json", folds)
    done = subprocess.run([sys.executable, "-m", "augsearch", "data", "check", str(out)], check=False)
    print(f"{out}: {CASES} phantoms, splits_final.json (fold 0: {SMALL} training cases, fold 1: {TRAIN_CASES}; "
          f"{len(folds[0]['val'])} validation) and {len(test)} test cases")
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/data/bundled"), help="data folder (default %(default)s)")
    parser.add_argument("--shift", help="a planted train vs val/test shift of `augsearch data synth` (a variant)")
    parser.add_argument("--size", type=int, help="edge length in pixels (default: the generator's 96)")
    args = parser.parse_args(argv)
    return prepare(args.out, args.shift, args.size)


if __name__ == "__main__":
    sys.exit(main())
