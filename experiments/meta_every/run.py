"""Wall time of a joint search against plain training, for several `meta_every`, on the quickstart config.

Each row is one `augsearch train` run of experiments/quickstart.toml (same seed, data and iterations):
`fixed` trains with the initial policy frozen (no meta-step, no TEA step), `joint-k` learns TRA and TEA with the
meta-step and the TEA step every k iterations (their Adam learning rates scaled by k, as the reference advises).
Reported: training wall time (sum of epoch times, validation excluded) relative to `fixed`, the final validation
lesion Dice, and the top learned ops. Usage: python experiments/meta_every/run.py [--out runs/meta_every] [--k 1 4 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "quickstart.toml"


def train(out: Path, name: str, sets: list[str]) -> dict:
    run_dir = out / name
    if not (run_dir / "checkpoint.pt").is_file():
        args = [sys.executable, "-m", "augsearch", "train", str(CONFIG), "--out", str(run_dir), "--quiet",
                "--set", "train.num_threads=1", "--set", f"name=\"meta-every-{name}\""]
        for item in sets:
            args += ["--set", item]
        subprocess.run(args, check=True, cwd=ROOT)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    policy = json.loads((run_dir / "policy.json").read_text())
    return {"name": name, "train_s": sum(m["time/epoch_s"] for m in lines),
            "val_dice_lesion": lines[-1]["val/dice_lesion"], "meta_steps": lines[-1]["meta/steps"],
            "tea_top": [s["name"] for s in policy["tea"]["selected"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/meta_every")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    rows = [train(out, "fixed", ["augment.tra.learn=false", "augment.tea.learn=false"])]
    for k in args.k:
        rows.append(train(out, f"joint-{k}", [f"augment.meta_every={k}", f"augment.tra.lr={0.05 * k}",
                                              f"augment.tea.lr={0.05 * k}"]))
    base = rows[0]["train_s"]
    print("| run | training wall time (s) | vs fixed | meta steps | val lesion Dice | TEA top entries |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['train_s']:.0f} | {r['train_s'] / base:.2f}x | {r['meta_steps']:.0f} | "
              f"{r['val_dice_lesion']:.3f} | {', '.join(r['tea_top'])} |")


if __name__ == "__main__":
    main()
