"""Planted-answer searches over several seeds: the README's tables, and the measurements tests/test_planted.py asserts.

    python experiments/planted/run.py --seeds 0 1 2 3 4 5 6 7 --threads 2 --out runs/planted

For each seed (the experiment `seed`: plain training and search together; the data, synth seed 0, stay fixed) it
trains the plain segmenters (plain_*.toml), then runs from them the joint flip_x search (flip_x.toml), the TEA-only
flip_x search (tea_flip_x.toml) and the joint gamma_up search (gamma_up.toml). One JSON line per seed and experiment
goes to <out>/results.jsonl and the tables are printed at the end. A run folder that already holds a checkpoint is
read, not retrained. The tests call the same functions for seed 0 with 2 threads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from augsearch.config import load_config, parse_override_value
from augsearch.policy.core import Policy
from augsearch.policy.io import load_policy
from augsearch.train import fit

PLANTED = Path(__file__).resolve().parent
# In 2D rot180_xy and flip_all are the same map (x and y mirrored); like flip_x they undo the lesion's planted side.
MIRRORS_X = ("flip_x", "rot180_xy", "flip_all")
# Bins that brighten (the power law's exponent below 1 on the image, or above 1 on the inverted image) and darken.
BRIGHTENING = (("gamma", -1), ("inverse_gamma", 1))
DARKENING = (("gamma", 1), ("inverse_gamma", -1))


def train(name: str, out: Path, seed: int, threads: int, init: Path | None = None,
          extra: dict | None = None) -> Path:
    """Train experiments/planted/<name>.toml into <out>/<name>/s<seed> unless it holds a checkpoint; the run folder.

    Data go to <out>/data/<shift>; `init` is a run folder whose checkpoint the run starts from; `extra`: more
    {dotted key: value} overrides (run.py --set).
    """
    cfg = load_config(PLANTED / f"{name}.toml", extra)
    run_dir = out / name / f"s{seed}"
    if not (run_dir / "checkpoint.pt").is_file():
        overrides = {**(extra or {}), "data.root": str(out / "data" / cfg.data.synth.shift), "seed": seed,
                     "train.num_threads": threads}
        if init is not None:
            overrides["train.init_checkpoint"] = str(init / "checkpoint.pt")
        fit(load_config(PLANTED / f"{name}.toml", overrides), run_dir, progress=False, overwrite=True)
    return run_dir


def foreground_p_on(policy: Policy) -> dict[str, float]:
    """P(op applied) of the foreground group, by op name."""
    p_on = policy.p_on().detach()[policy.group_names.index("foreground")]
    return {name: float(p) for name, p in zip(policy.op_names, p_on, strict=True)}


def foreground_mass(policy: Policy, bins: tuple[tuple[str, int], ...], group: str = "foreground") -> float:
    """The group's probability of the (op, sign) bins listed."""
    probs = policy.tra_probs().detach()[policy.group_names.index(group)]
    total = 0.0
    for op, sign in bins:
        k = policy.op_names.index(op)
        total += sum(float(probs[k, j]) for j, b in enumerate(policy.op_bins[k]) if b.sign == sign)
    return total


def joint_flip_x(out: Path, seed: int, threads: int) -> dict:
    run = train("flip_x", out, seed, threads, init=train("plain_flip_x", out, seed, threads))
    p_on = foreground_p_on(load_policy(run / "policy.json"))
    ranked = sorted(p_on, key=p_on.get, reverse=True)
    runner_up = next(name for name in ranked if name != "flip_x")
    return {"flip_x": p_on["flip_x"], "rank": ranked.index("flip_x") + 1, "runner_up": runner_up,
            "runner_up_p": p_on[runner_up], "ops": sorted(p_on)}


def tea_flip_x(out: Path, seed: int, threads: int) -> dict:
    run = train("tea_flip_x", out, seed, threads, init=train("plain_flip_x", out, seed, threads))
    policy = load_policy(run / "policy.json")
    probs = policy.tea_probs().detach()
    names = policy.tea_names
    return {"first": names[int(probs.argmax())], "first_p": float(probs.max()),
            "x_mirror_mass": sum(float(probs[names.index(n)]) for n in MIRRORS_X)}


def joint_gamma_up(out: Path, seed: int, threads: int) -> dict:
    run = train("gamma_up", out, seed, threads, init=train("plain_gamma_up", out, seed, threads))
    policy = load_policy(run / "policy.json")
    return {"brighten": foreground_mass(policy, BRIGHTENING), "darken": foreground_mass(policy, DARKENING),
            "flip_x": foreground_p_on(policy)["flip_x"]}


def _group_brightening(name: str, out: Path, seed: int, threads: int, extra: dict | None) -> dict:
    # The training cases do not depend on the planted shift (it acts on validation and test cases only), so every
    # gamma search starts from the same plain segmenter.
    run = train(name, out, seed, threads, init=train("plain_gamma_up", out, seed, threads, extra=extra), extra=extra)
    policy = load_policy(run / "policy.json")
    row = {f"{group}_{kind}": foreground_mass(policy, bins, group) for group in ("foreground", "background")
           for kind, bins in (("brighten", BRIGHTENING), ("darken", DARKENING))}
    return {**row, "lead": row["foreground_brighten"] - row["background_brighten"]}


def class_specific_gamma(out: Path, seed: int, threads: int, extra: dict | None = None) -> dict:
    """fg_gamma_up.toml: the shift acts around the labels only; the foreground group should brighten more."""
    return _group_brightening("fg_gamma_up", out, seed, threads, extra)


def class_specific_control(out: Path, seed: int, threads: int, extra: dict | None = None) -> dict:
    """gamma_up_groups.toml: the same search with the shift everywhere; both groups should brighten."""
    return _group_brightening("gamma_up_groups", out, seed, threads, extra)


EXPERIMENTS = {"joint_flip_x": joint_flip_x, "tea_flip_x": tea_flip_x, "joint_gamma_up": joint_gamma_up,
               "class_specific_gamma": class_specific_gamma, "class_specific_control": class_specific_control}


def _shown(row: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "ops")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=2, help="train.num_threads (the tests use 2)")
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), nargs="+", default=sorted(EXPERIMENTS))
    parser.add_argument("--out", type=Path, default=Path("runs/planted"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run of the class_specific_* experiments (e.g. "
                             "data.synth.size=128)")
    args = parser.parse_args()
    extra = {key.strip(): parse_override_value(value.strip())
             for key, _, value in (text.partition("=") for text in args.overrides)}
    if extra and not set(args.only) <= {"class_specific_gamma", "class_specific_control"}:
        parser.error("--set applies to the class_specific_* experiments only; add --only with those")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[int, dict]] = {name: {} for name in args.only}
    with open(args.out / "results.jsonl", "a") as log:
        for seed in args.seeds:
            for name in args.only:
                row = EXPERIMENTS[name](args.out, seed, args.threads, **({"extra": extra} if extra else {}))
                rows[name][seed] = row
                log.write(json.dumps({"experiment": name, "seed": seed, "threads": args.threads, **row,
                                      **({"overrides": extra} if extra else {})}) + "\n")
                log.flush()
                print(name, seed, _shown(row), flush=True)
    for name, by_seed in rows.items():
        print(f"\n{name} ({args.threads} threads)")
        for seed, row in by_seed.items():
            print(f"  seed {seed}: {_shown(row)}")


if __name__ == "__main__":
    main()
