"""Signal of the TRA meta-gradient: per-coordinate |mean| / std of R independent draws against pure noise.

At a few points of a real joint search (after S segmenter steps, segmenter and policy frozen there), R independent
meta-gradients of the TRA logits are drawn (fresh training and validation batches and augmentations each time) and
compared (METHOD 13):

- snr: the median over the policy's learnable coordinates of |mean| / std across the R draws; `noise_snr` is the same
  statistic on Gaussian noise of the same shape and R, so a gradient without signal scores about `noise_snr`;
- halves_cosine: the cosine between the means of two disjoint halves of the draws (0 for noise, 1 for a clean signal).

Each row pools N workers (a draw is then the mean of N independent draws, what the policy server steps on) or uses
one option: a 32 + 32 meta-batch, accumulation of k iterations (k draws along k real segmenter steps, averaged),
Adam's preconditioner in the JVP tangent (augment.tra.precondition), a rare-class over-sampled outer batch
(augment.tra.outer_rare_fraction), the score-function estimator (augment.tra.estimator = "reinforce"). Results are
JSON; experiments/signal/ holds a run.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "experiments/comparison/joint.toml"
OPTIONS = ("base", "batch32", "accumulate", "precondition", "rare_outer", "reinforce")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the search config measured (its train/augment)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--points", nargs="+", type=int, default=[25, 100, 250],
                        help="segmenter steps S at which the gradient is measured (multiples of train.iterations)")
    parser.add_argument("--draws", type=int, default=32, help="R: draws per statistic (even)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4], help="N pooled workers of 'base'")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--accumulate", type=int, default=4, help="k of the 'accumulate' option")
    parser.add_argument("--big-batch", type=int, default=32, help="meta-batch (train and outer) of 'batch32'")
    parser.add_argument("--rare-fraction", type=float, default=0.5, help="outer-batch rare share of 'rare_outer'")
    parser.add_argument("--seed", type=int, default=0)


def signal_statistics(draws: "torch.Tensor", noise_seed: int = 0, noise_replicates: int = 200) -> dict[str, Any]:  # noqa: F821
    """draws (R, D): R gradient draws over D coordinates -> snr, noise_snr, halves_cosine, noise_halves_cosine, and
    the central 95% of both statistics over `noise_replicates` noise draws (noise_snr_band, noise_cosine_band).

    Coordinates that never vary (std 0: a group absent from every batch) are left out and counted.
    """
    import torch

    draws = draws.double()
    r = draws.shape[0]
    std = draws.std(0)
    live = std > 0
    x = draws[:, live]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=torch.float64)

    def snr(t: torch.Tensor) -> float:
        return float((t.mean(0).abs() / t.std(0)).median())

    def halves(t: torch.Tensor) -> float:
        a, b = t[: r // 2].mean(0), t[r // 2:].mean(0)
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    generator = torch.Generator().manual_seed(noise_seed + 1)
    replicates = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for _ in range(noise_replicates)]
    snrs = torch.tensor([snr(t) for t in replicates], dtype=torch.float64)
    cosines = torch.tensor([halves(t) for t in replicates], dtype=torch.float64)
    band = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return {"snr": snr(x), "noise_snr": snr(noise), "noise_snr_band": snrs.quantile(band).tolist(),
            "halves_cosine": halves(x), "noise_halves_cosine": halves(noise),
            "noise_cosine_band": cosines.quantile(band).tolist(),
            "coordinates": int(live.sum()), "constant_coordinates": int((~live).sum())}


class _Point:
    """A run restored at one point of the search, with a way to draw meta-gradients there."""

    def __init__(self, cfg, checkpoint: Path, run_dir: Path, seed: int):
        import numpy as np
        import torch

        from augsearch.artifacts.checkpoint import load_checkpoint
        from augsearch.train import _Run

        self.run = _Run(cfg, run_dir, log=lambda message: None)
        self.run.restore(load_checkpoint(checkpoint, map_location=self.run.device))
        self.model_state = copy.deepcopy(self.run.model.state_dict())
        self.optimizer_state = copy.deepcopy(self.run.optimizer.state_dict())
        self.seed = seed
        self.generator = torch.Generator(device=self.run.device).manual_seed(seed)
        self.run.train_rng = np.random.default_rng([seed, 10])
        self.run.val_rng = np.random.default_rng([seed, 11])
        self.lr = self.run.optimizer.param_groups[0]["lr"]

    def draw(self, batch: int, val_batch: int) -> "torch.Tensor | None":  # noqa: F821
        from augsearch.train import _batch_to

        run = self.run
        train = _batch_to(run.train_sampler.sample(batch, generator=run.train_rng), run.device)
        val = _batch_to(run.outer_batch(val_batch), run.device)
        inner_lr = run.cfg.augment.tra.inner_lr or self.lr
        grad = run.step.meta_gradient_draw(train, val, inner_lr=inner_lr, generator=self.generator)
        return None if grad is None else grad[:, run.policy.available].reshape(-1).detach().cpu()

    def segmenter_step(self, batch: int) -> None:
        from augsearch.train import _batch_to

        run = self.run
        train = _batch_to(run.train_sampler.sample(batch, generator=run.train_rng), run.device)
        run.step.run(train, None, None, inner_lr=self.lr, generator=self.generator)

    def reset(self) -> None:
        """Back to the point's segmenter and optimiser state (after segmenter steps)."""
        self.run.model.load_state_dict(self.model_state)
        self.run.optimizer.load_state_dict(self.optimizer_state)


def _draws(point: _Point, count: int, batch: int, val_batch: int) -> "torch.Tensor":  # noqa: F821
    import torch

    out = []
    while len(out) < count:
        grad = point.draw(batch, val_batch)
        if grad is not None:  # a non-finite draw is skipped by the search too
            out.append(grad)
    return torch.stack(out)


def _pooled(draws: "torch.Tensor", n: int) -> "torch.Tensor":  # noqa: F821
    """(R * n, D) draws -> (R, D): means of consecutive groups of n (n workers' contributions to one step)."""
    return draws.reshape(-1, n, draws.shape[-1]).mean(1)


def _measure(cfg, checkpoint: Path, tmp: Path, args: argparse.Namespace, steps: int) -> list[dict[str, Any]]:
    import time

    from augsearch.config import apply_overrides, config_from_dict

    t = cfg.train
    rows = []

    def row(option: str, workers: int, draws, started: float, **extra) -> None:
        rows.append({"steps": steps, "option": option, "workers": workers, "draws": int(draws.shape[0]),
                     **extra, **signal_statistics(draws, noise_seed=args.seed),
                     "seconds": time.perf_counter() - started})
        _say(f"S={steps} {option} N={workers}: snr {rows[-1]['snr']:.3f} (noise {rows[-1]['noise_snr']:.3f}), "
             f"halves cosine {rows[-1]['halves_cosine']:+.2f}")

    def point(option_overrides: dict[str, Any], seed: int) -> _Point:
        option_cfg = config_from_dict(apply_overrides(cfg.to_dict(), option_overrides))
        return _Point(option_cfg, checkpoint, tmp / f"point_{steps}", seed)

    r = args.draws
    for option in args.options:
        started = time.perf_counter()
        seed = args.seed * 1000 + steps * 10 + OPTIONS.index(option)
        if option == "base":
            p = point({}, seed)
            most = max(args.workers)
            draws = _draws(p, r * most, t.batch_size, t.val_batch_size)
            for n in args.workers:
                row("base", n, _pooled(draws[: r * n], n), started, meta_batch=[t.batch_size, t.val_batch_size])
        elif option == "batch32":
            p = point({}, seed)
            row("batch32", 1, _draws(p, r, args.big_batch, args.big_batch), started,
                meta_batch=[args.big_batch, args.big_batch])
        elif option == "accumulate":
            p = point({}, seed)
            import torch

            draws = []
            for _ in range(r):
                parts = []
                for _ in range(args.accumulate):
                    parts.append(_draws(p, 1, t.batch_size, t.val_batch_size)[0])
                    p.segmenter_step(t.batch_size)
                p.reset()
                draws.append(sum(parts) / len(parts))
            row("accumulate", 1, torch.stack(draws), started, k=args.accumulate)
        elif option == "precondition":
            p = point({"augment.tra.precondition": True}, seed)
            draws = _draws(p, r * max(args.workers), t.batch_size, t.val_batch_size)
            for n in (1, max(args.workers)):
                row("precondition", n, _pooled(draws[: r * n], n), started)
        elif option == "reinforce":
            p = point({"augment.tra.estimator": "reinforce"}, seed)
            draws = _draws(p, r * max(args.workers), t.batch_size, t.val_batch_size)
            for n in (1, max(args.workers)):
                row("reinforce", n, _pooled(draws[: r * n], n), started)
        elif option == "rare_outer":
            p = point({"augment.tra.outer_rare_fraction": args.rare_fraction}, seed)
            row("rare_outer", 1, _draws(p, r, t.batch_size, t.val_batch_size), started,
                outer_rare_fraction=args.rare_fraction)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from augsearch.bench import environment
    from augsearch.config import load_config
    from augsearch.devices import resolve_device
    from augsearch.errors import AugsearchError
    from augsearch.train import fit

    if args.draws < 4 or args.draws % 2:
        raise AugsearchError(f"--draws must be an even number >= 4 (two halves), got {args.draws}")
    device = resolve_device(args.device)
    cfg = load_config(args.config, args.overrides + [f"train.device={device}"])
    t = cfg.train
    if not (cfg.augment.tra.learn and cfg.augment.mode == "policy"):
        raise AugsearchError(f"{args.config} learns no TRA policy; the signal benchmark measures a joint search "
                             f"(augment.tra.learn = true)")
    bad = [s for s in args.points if s <= 0 or s % t.iterations or s > t.epochs * t.iterations]
    if bad:
        raise AugsearchError(f"--points {bad}: each must be a positive multiple of train.iterations={t.iterations} "
                             f"up to train.epochs x iterations = {t.epochs * t.iterations}")
    torch.set_num_threads(t.num_threads or 1)
    tmp = Path(tempfile.mkdtemp(prefix="augsearch-signal-"))
    try:
        # the search itself (its own schedule over train.epochs), a checkpoint kept at every requested point
        saved: dict[int, Path] = {}
        last = max(args.points)

        def keep(report) -> None:
            steps = report.epoch * t.iterations
            if steps in args.points and report.checkpoint_path is not None:
                saved[steps] = tmp / f"checkpoint_{steps}.pt"
                shutil.copy2(report.checkpoint_path, saved[steps])
            _say(f"search: {steps}/{last} segmenter steps")
            if steps >= last:
                raise _StopSearch

        search_cfg = cfg.model_copy(update={"train": t.model_copy(update={"checkpoint_every": 1})})
        try:
            fit(search_cfg, tmp / "search", callbacks=[keep], progress=False)
        except _StopSearch:
            pass
        rows = []
        for steps in sorted(args.points):
            rows.extend(_measure(cfg, saved[steps], tmp, args, steps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": "signal", "environment": environment(device), "config": args.config,
            "overrides": args.overrides, "draws": args.draws, "results": rows}


def _say(message: str) -> None:
    """A progress line on stderr (stdout carries the JSON results)."""
    print(f"[bench signal] {message}", file=sys.stderr, flush=True)


class _StopSearch(Exception):
    """Ends the search once the last requested point is saved."""
