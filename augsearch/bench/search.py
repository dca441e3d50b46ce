"""Search scheduling overhead on the embedded local Ray: submission to first report per trial, wall vs trial time."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "smoke.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=4, help="number of trials (seeds 0..N-1)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment TOML (default: smoke.toml)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2, help="iterations per epoch")
    parser.add_argument("--quick", action="store_true", help="two trials, one epoch")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import os

    from augsearch.bench import environment
    from augsearch.config import load_config
    from augsearch.devices import resolve_device
    from augsearch.tune.ray_tune import ray_session
    from augsearch.tune.search import new_search

    device = resolve_device(args.device)
    trials, epochs = (2, 1) if args.quick else (args.trials, args.epochs)
    with tempfile.TemporaryDirectory(prefix="augsearch-bench-search-") as tmp:
        overrides = {"train.epochs": epochs, "train.iterations": args.iterations, "data.root": f"{tmp}/data",
                     "train.device": device.type, "search.space": {"seed": list(range(trials))},
                     "search.cpus_per_trial": 1, "search.gpus_per_trial": 0.5 if device.type == "cuda" else 0.0,
                     "search.num_samples": 1, "search.scheduler": "none"}
        cfg = load_config(args.config, overrides)

        start = time.perf_counter()
        local = new_search(cfg, Path(tmp) / "local", use_ray=False)
        local_wall = time.perf_counter() - start

        start = time.perf_counter()
        with ray_session(None):
            init_s = time.perf_counter() - start
            submitted = time.time()
            start = time.perf_counter()
            ray = new_search(cfg, Path(tmp) / "ray", use_ray=True)
            ray_wall = time.perf_counter() - start

    per_trial = []
    for row in ray.rows:
        timing = row["timing"]
        per_trial.append({
            "trial": row["trial"], "status": row["status"],
            "submit_to_start_s": timing["trial_start"] - submitted,
            "submit_to_first_report_s": timing["first_report"] - submitted,
            "start_to_first_report_s": timing["first_report"] - timing["trial_start"],
            "trial_s": timing["last_report"] - timing["trial_start"],
        })
    concurrency = max(1, int((os.cpu_count() or 1) // cfg.search.cpus_per_trial))
    ray_sum = sum(t["trial_s"] for t in per_trial)
    local_sum = sum(r["timing"]["last_report"] - r["timing"]["trial_start"] for r in local.rows)
    first_wave = sorted(per_trial, key=lambda t: t["submit_to_start_s"])[:concurrency]
    return {
        "benchmark": "search",
        "trials": trials, "epochs": epochs, "iterations": args.iterations, "concurrency": concurrency,
        "ray_init_s": init_s,
        "ray_wall_s": ray_wall, "ray_sum_trial_s": ray_sum,
        "ray_parallel_efficiency": ray_sum / (ray_wall * concurrency),
        "first_wave_submit_to_start_s": max(t["submit_to_start_s"] for t in first_wave),
        "median_submit_to_first_report_s": sorted(
            t["submit_to_first_report_s"] for t in per_trial
        )[len(per_trial) // 2],
        "local_wall_s": local_wall, "local_sum_trial_s": local_sum,
        "ray_wall_over_local_wall": ray_wall / local_wall,
        "per_trial": per_trial,
        "environment": environment(device),
    }
