"""Wall time and quality of a joint search against plain training, for several `meta_every`.

The search is the planted flip_x search (experiments/planted/flip_x.toml), where the quality of a learned policy is
known: the foreground group's P(flip_x) should end first among the ops, and the segmenter should find the lesion on
the mirrored validation cases. For each k, one run learns TRA and TEA with the meta-step and the TEA step every k
iterations for 100 * k iterations (so every k sees about 100 meta-steps at the same TRA and TEA rates), and one
run trains the same number of iterations under the fixed initial policy (no meta-step, no TEA step): the plain
training it is timed against. All start from the same plain segmenter (experiments/planted/plain_flip_x.toml).

    python experiments/meta_every/run.py --k 1 4 8 --seeds 0 1 2 --threads 2 --out runs/meta_every

Reported per (k, seed): training wall time (sum of epoch times, validation excluded) of both runs and their ratio,
P(flip_x) and its rank among the 12 ops, the runner-up, and the final validation lesion Dice of both runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from augsearch.config import load_config
from augsearch.policy.io import load_policy
from augsearch.train import fit

PLANTED = Path(__file__).resolve().parents[1] / "planted"
META_STEPS = 100
ITERATIONS_PER_EPOCH = 50


def _fit(config: str, run_dir: Path, overrides: dict) -> list[dict]:
    """Train unless run_dir holds a finished run; the run's metrics.jsonl lines."""
    if not (run_dir / "checkpoint.pt").is_file():
        fit(load_config(PLANTED / f"{config}.toml", overrides), run_dir, progress=False, overwrite=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_k(out: Path, k: int, seed: int, threads: int) -> dict:
    common = {"data.root": str(out / "data"), "seed": seed, "train.num_threads": threads}
    plain = out / f"plain/s{seed}"
    _fit("plain_flip_x", plain, common)
    epochs = META_STEPS * k // ITERATIONS_PER_EPOCH
    search = {**common, "train.init_checkpoint": str(plain / "checkpoint.pt"), "train.epochs": epochs,
              "train.iterations": ITERATIONS_PER_EPOCH, "train.validate_every": epochs}
    joint = _fit("flip_x", out / f"joint-{k}/s{seed}", {**search, "augment.meta_every": k})
    fixed = _fit("flip_x", out / f"fixed-{k}/s{seed}",
                 {**search, "augment.tra.learn": False, "augment.tea.learn": False})
    policy = load_policy(out / f"joint-{k}/s{seed}/policy.json")
    p_on = policy.p_on().detach()[policy.group_names.index("foreground")]
    ranked = sorted(zip(policy.op_names, map(float, p_on)), key=lambda item: -item[1])
    names = [name for name, _ in ranked]
    joint_s = sum(m["time/epoch_s"] for m in joint)
    fixed_s = sum(m["time/epoch_s"] for m in fixed)
    runner_up = ranked[1] if names[0] == "flip_x" else ranked[0]
    return {
        "k": k, "seed": seed, "iterations": epochs * ITERATIONS_PER_EPOCH, "meta_steps": joint[-1]["meta/steps"],
        "joint_s": round(joint_s, 1), "fixed_s": round(fixed_s, 1), "ratio": round(joint_s / fixed_s, 2),
        "flip_x": round(float(p_on[policy.op_names.index("flip_x")]), 3), "rank": names.index("flip_x") + 1,
        "runner_up": f"{runner_up[0]} {runner_up[1]:.3f}",
        "val_lesion_joint": round(joint[-1]["val/dice_lesion"], 3),
        "val_lesion_fixed": round(fixed[-1]["val/dice_lesion"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/meta_every"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "results.jsonl", "a") as log:
        for seed in args.seeds:
            for k in args.k:
                rows.append(run_k(out, k, seed, args.threads))
                log.write(json.dumps(rows[-1]) + "\n")
                log.flush()
                print(rows[-1], flush=True)
    print("\n| k | seed | iterations | search s | plain s | ratio | P(flip_x) | rank | runner-up "
          "| val lesion Dice (search / plain) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['seed']} | {r['iterations']} | {r['joint_s']} | {r['fixed_s']} | {r['ratio']}x | "
              f"{r['flip_x']} | {r['rank']} | {r['runner_up']} | {r['val_lesion_joint']} / {r['val_lesion_fixed']} |")


if __name__ == "__main__":
    main()
