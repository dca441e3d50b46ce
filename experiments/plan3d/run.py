"""A planned config on the bundled 3D benchmark: does it learn the lesion and recover a planted shift?

    python experiments/plan3d/run.py --out runs/plan3d --jobs 2                 # the README's numbers
    python experiments/plan3d/run.py --out runs/plan3d --aggregate              # the table from results.json only

For the planted shift (validation and test cases mirrored along x, `augsearch data synth --dims 3 --shift flip_x`)
and for the benchmark without a planted shift (the control), it writes the dataset, plans a CPU config for it with
`augsearch plan` (planner functions, same output), runs the planned joint search as written except for the budget
(epochs, iterations, validation interval) and one torch thread, and records the validation lesion Dice and the learned
policy's probability of the undoing op: the foreground group's P(flip_x) and the TEA mass of the entries that mirror
x. One JSON object per run goes to <out>/results.json; `--results` copies it (the committed results.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.atomic import write_json, write_text
from augsearch.config import config_from_dict, load_config
from augsearch.data.cases import load_cases
from augsearch.data.dataset import read_dataset_info
from augsearch.data.plan import fingerprint, make_plan, plan_toml
from augsearch.data.preprocess import complete_preprocess
from augsearch.data.splits import resolve_splits
from augsearch.data.synthetic import write_benchmark
from augsearch.metrics import dice
from augsearch.model import UNet
from augsearch.policy.io import load_policy
from augsearch.predict.tta import predict_tta, selected_views
from augsearch.train import fit

HERE = Path(__file__).resolve().parent
SHIFTS = {"flip_x": "flip_x", "control": None}  # run name -> planted shift
# TEA entries that mirror x (the organ's lesion side): with y and z mirrored too they still undo the planted flip.
MIRRORS_X = ("flip_x", "rot180_xy", "rot180_xz", "flip_all")


def run_one(name: str, out: Path, *, size: int, cases: int, train_cases: int, epochs: int, iterations: int,
            validate_every: int, seed: int, threads: int, policy: str | None = None) -> dict:
    """Synthesise, plan, search; the measurements of one run (run folder: <out>/<name>, or <name>-<policy> when the
    TRA start `policy` replaces the planned one)."""
    data = out / "data" / name
    if not (data / "dataset.json").is_file():
        write_benchmark(data, dims=3, cases=cases, train_cases=train_cases, size=size, seed=0, shift=SHIFTS[name])
    plan = make_plan(fingerprint(data), device="cpu", mode="joint")
    planned = out / f"{name}.toml"
    write_text(planned, plan_toml(plan, str(data)))
    overrides = {"train.epochs": epochs, "train.iterations": iterations, "train.validate_every": validate_every,
                 "train.num_threads": threads, "seed": seed}
    if policy is not None:
        overrides["augment.policy"] = policy
    run = name if policy is None else f"{name}-{policy}"
    start = time.process_time()
    fit(load_config(planned, overrides), out / run, progress=False)
    cpu_s = time.process_time() - start
    return {"run": run, "shift": SHIFTS[name], "seed": seed, "cpu_minutes": round(cpu_s / 60, 2),
            "planned": {"patch_size": plan.patch_size, "batch_size": plan.batch_size,
                        "target_spacing": plan.target_spacing, "base_features": plan.base_features,
                        "depth": len(plan.pool_kernels) + 1, "rare_labels": plan.rare_labels,
                        "tea_exclude": plan.tea_exclude, "optimizer": [plan.optimizer, plan.lr]},
            "overrides": overrides, **measure(out / run)}


def test_dice(run_dir: Path) -> dict:
    """Lesion and organ Dice (means over the test cases where defined) of the run's last checkpoint on the benchmark's
    test cases, whole volumes predicted plainly and with the learned TEA (the policy's selected entries)."""
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = config_from_dict(ckpt.config, source=str(run_dir / "checkpoint.pt"))
    info = read_dataset_info(cfg.data.root)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else info.root / ".augsearch_cache"
    preprocess = complete_preprocess(info, cfg.data.preprocess, cache)
    cases = load_cases(info, resolve_splits(info, cfg.data.split).test, preprocess, cache)
    model = UNet(**ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    policy = load_policy(run_dir / "policy.json")
    scores: dict[str, dict[str, list[float]]] = {way: {"lesion": [], "organ": []} for way in ("plain", "tea")}
    for case in cases:
        for way, views in (("plain", None), ("tea", policy)):
            result = predict_tta(model, case.image, views, spacing=case.spacing, window=cfg.train.patch_size)
            prediction = result.probabilities.argmax(0).numpy()
            for name, per_case in scores[way].items():
                per_case.append(dice(prediction == ckpt.label_names[name], case.label == ckpt.label_names[name]))
    return {"cases": len(cases), "tea_entries": [policy.tea_names[i] for i in selected_views(policy, 3)[0]],
            **{f"{way}_dice_{name}": round(float(np.nanmean(v)), 4)
               for way, by in scores.items() for name, v in by.items()}}


def measure(run_dir: Path) -> dict:
    """Validation Dice per epoch, test Dice at the end, and the final policy's P(flip_x) per group and TEA x-mirror
    mass."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [{"step": r["step"], "dice_lesion": r["val/dice_lesion"], "dice_organ": r["val/dice_organ"]}
             for r in rows if "val/dice_lesion" in r]
    policy = load_policy(run_dir / "policy.json")
    p_on = policy.p_on().detach()
    flip = policy.op_names.index("flip_x")
    fg = p_on[policy.group_names.index("foreground")]
    tea = dict(zip(policy.tea_names, policy.tea_probs().detach().tolist(), strict=True))
    top = max(tea, key=tea.get)
    return {
        "val_dice_lesion": curve[-1]["dice_lesion"], "val_dice_organ": curve[-1]["dice_organ"], "curve": curve,
        "test": test_dice(run_dir),
        "p_flip_x": {g: round(float(p_on[i, flip]), 4) for i, g in enumerate(policy.group_names)},
        "fg_rank_flip_x": 1 + int((fg > fg[flip]).sum()),
        "tea_x_mirror_mass": round(sum(tea[n] for n in MIRRORS_X), 4), "tea_top": [top, round(tea[top], 4)],
    }


def table(results: list[dict]) -> str:
    lines = ["| run | iterations | lesion Dice (val) | organ Dice (val) | lesion Dice (test: plain / TEA) | "
             "organ Dice (test: plain / TEA) | "
             "fg P(flip_x) | bg P(flip_x) | fg rank of flip_x | TEA x-mirror mass | TEA top | CPU min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        test, p = r["test"], r["p_flip_x"]
        lines.append(f"| {r['run']} (seed {r['seed']}) | {r['curve'][-1]['step']} | {r['val_dice_lesion']:.3f} | "
                     f"{r['val_dice_organ']:.3f} | {test['plain_dice_lesion']:.3f} / {test['tea_dice_lesion']:.3f} | "
                     f"{test['plain_dice_organ']:.3f} / {test['tea_dice_organ']:.3f} | {p['foreground']:.3f} | "
                     f"{p['background']:.3f} | {r['fg_rank_flip_x']} | {r['tea_x_mirror_mass']:.3f} | "
                     f"{r['tea_top'][0]} {r['tea_top'][1]:.2f} | {r['cpu_minutes'] or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/plan3d"))
    parser.add_argument("--runs", nargs="+", choices=list(SHIFTS), default=list(SHIFTS))
    parser.add_argument("--size", type=int, default=32, help="benchmark edge in voxels (default %(default)s)")
    parser.add_argument("--cases", type=int, default=28)
    parser.add_argument("--train-cases", type=int, default=18)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--validate-every", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default=None,
                        help="TRA start replacing the planned one (e.g. uniform-0.1: every op at 0.1, flips included)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each")
    parser.add_argument("--results", type=Path, default=None, help="also write results.json here")
    parser.add_argument("--aggregate", action="store_true", help="print the table of <out>/results.json only")
    parser.add_argument("--measure", nargs="+", default=None, metavar="RUN",
                        help="measure these run folders under --out as they stand (runs cut short included) into "
                             "<out>/results-measured.json, without training")
    args = parser.parse_args(argv)
    if args.aggregate:
        print(table(json.loads((args.out / "results.json").read_text())["runs"]))
        return 0
    if args.measure:
        rows = []
        for run in args.measure:
            config = json.loads((args.out / run / "config.json").read_text())
            steps = config["train"]["epochs"] * config["train"]["iterations"]
            rows.append({"run": run, "shift": SHIFTS[run.split("-")[0]], "seed": config["seed"], "cpu_minutes": None,
                         "planned_iterations": steps, **measure(args.out / run)})
        write_json(args.out / "results-measured.json",
                   {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "runs": rows})
        print(table(rows))
        return 0
    torch.set_num_threads(args.threads)
    kwargs = dict(size=args.size, cases=args.cases, train_cases=args.train_cases, epochs=args.epochs,
                  iterations=args.iterations, validate_every=args.validate_every, seed=args.seed, threads=args.threads,
                  policy=args.policy)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, name, args.out, **kwargs) for name in args.runs]
        results = [future.result() for future in futures]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    document = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit.strip(),
                "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s) per run, "
                           f"{args.jobs} run(s) at once",
                "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "runs": results}
    results_path = args.out / ("results.json" if args.policy is None else f"results-{args.policy}.json")
    write_json(results_path, document)
    if args.results is not None:
        write_json(args.results, document)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
