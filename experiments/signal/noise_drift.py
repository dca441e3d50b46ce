"""Where the TRA optimiser takes a policy when its meta-gradients are pure noise.

The signal benchmark finds the TRA meta-gradient on MSD Hippocampus indistinguishable from noise, yet the learned
policies there end applying more ops a patch than their start (1.5-3.8 against 1.0). This replays a run's TRA
optimiser (the package's `tra_adam`, the poly decay by epoch, the meta-steps a run takes after its warm-up) from a run's
start policy with gradients that carry no information: Gaussian, on the live logits only (a bin at zero probability
gets no gradient), centred within each op and group (a softmax's gradient sums to zero over its bins). It reports the
expected ops a patch (sum over ops of P(op applied)) and each op's P(applied) at the end, over many replicates, beside
the learned policies of the runs given.

    python experiments/signal/noise_drift.py \
        --runs 'experiments/hippocampus/results_gpu/train10/tra_from_randaugment/seed*.json' \
        --json experiments/signal/noise_drift/hippocampus_row12.json

--runs takes the protocol's per-run JSON files (experiments/protocol/run.py) of one row: the replay uses their config
and overrides, and their learned P(op applied) is set beside it. --set changes the replay only (what a lower rate
would have done to noise: `--set augment.tra.lr=0.0125`).
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import torch

from augsearch.config import load_config
from augsearch.data.dataset import read_dataset_info
from augsearch.learn.server import tra_adam
from augsearch.policy.core import Policy
from augsearch.policy.presets import policy_from_file_or_preset
from augsearch.schedules import poly_lr, set_lr

DEAD_LOGIT = -1000.0  # at or below: a bin the start gives zero probability (logit -1e4), which no gradient reaches


def start_policy(cfg, labels: dict[str, int]) -> Policy:
    """The run's initial policy, for the dataset's label name -> value."""
    aug = cfg.augment
    return policy_from_file_or_preset(aug.policy, len(cfg.train.patch_size), labels,
                                      class_specific=aug.tra.class_specific, randaugment_n=aug.randaugment_n,
                                      randaugment_m=aug.randaugment_m, ops=aug.ops)


def noise_gradient(live: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """live (G, n_ops, bins) bool -> (G, n_ops, bins) Gaussian noise on the live bins, centred over each op's."""
    noise = torch.randn(live.shape, generator=generator) * live
    mean = noise.sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp(min=1)
    return (noise - mean) * live


def replay(cfg, labels: dict[str, int], replicate: int) -> Policy:
    """The start policy after the run's meta-steps, each fed a noise gradient."""
    policy = start_policy(cfg, labels)
    live = policy.tra_logits.detach() > DEAD_LOGIT
    optimizer = tra_adam(policy.tra_logits, cfg.augment)
    generator = torch.Generator().manual_seed(replicate)
    t, warmup = cfg.train, cfg.augment.warmup_iterations
    for epoch in range(t.epochs):
        set_lr(optimizer, poly_lr(cfg.augment.tra.lr, epoch, t.epochs, t.poly_power))
        for iteration in range(t.iterations):
            if epoch * t.iterations + iteration < warmup or iteration % cfg.augment.meta_every:
                continue
            optimizer.zero_grad()
            policy.tra_logits.grad = noise_gradient(live, generator)
            optimizer.step()
    return policy


def p_on_of(policies: list[Policy]) -> torch.Tensor:
    """(R, G, n_ops) P(op applied) of each policy."""
    return torch.stack([p.p_on().detach() for p in policies])


def learned_p_on(runs: list[dict], groups: tuple[str, ...], ops: tuple[str, ...]) -> torch.Tensor:
    """(R, G, n_ops) P(op applied) at the end of each run, from its per-run JSON (policy.p_on)."""
    return torch.tensor([[[run["policy"]["p_on"][g][op] for op in ops] for g in groups] for run in runs])


def summary(p_on: torch.Tensor, groups: tuple[str, ...], ops: tuple[str, ...]) -> dict:
    """p_on (R, G, n_ops) -> expected ops a patch per group (mean, min, max over R) and each op's P(applied)."""
    ops_per_patch = p_on.sum(-1)  # (R, G)
    return {
        "n": p_on.shape[0],
        "ops_per_patch": {g: {"mean": float(ops_per_patch[:, i].mean()), "min": float(ops_per_patch[:, i].min()),
                              "max": float(ops_per_patch[:, i].max())} for i, g in enumerate(groups)},
        "p_on": {g: {op: {"mean": float(p_on[:, i, j].mean()), "max": float(p_on[:, i, j].max())}
                     for j, op in enumerate(ops)} for i, g in enumerate(groups)},
    }


def outside_noise(learned: torch.Tensor, noise: torch.Tensor, groups: tuple[str, ...], ops: tuple[str, ...],
                  draws: int = 10000) -> dict:
    """Ops whose mean P(applied) over the learned runs (R, G, n_ops) lies outside the central 95% of the mean of as
    many noise replicates (drawn from `noise`, (R', G, n_ops))."""
    picks = torch.randint(noise.shape[0], (draws, learned.shape[0]), generator=torch.Generator().manual_seed(0))
    means = noise[picks].mean(1)  # (draws, G, n_ops)
    low, high = means.quantile(0.025, dim=0), means.quantile(0.975, dim=0)
    mean = learned.mean(0)
    return {g: {op: {"learned": float(mean[i, j]), "noise_band": [float(low[i, j]), float(high[i, j])]}
                for j, op in enumerate(ops) if not low[i, j] <= mean[i, j] <= high[i, j]}
            for i, g in enumerate(groups)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="glob of one row's per-run JSON files")
    parser.add_argument("--set", action="append", default=[], help="config override for the replay only")
    parser.add_argument("--replicates", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    files = sorted(glob.glob(args.runs))
    if not files:
        raise SystemExit(f"no run files match {args.runs!r}")
    runs = [json.loads(Path(f).read_text()) for f in files]
    cfg = load_config(runs[0]["config"], [*runs[0]["overrides"], *args.set])
    labels = read_dataset_info(Path(cfg.data.root)).labels
    start = start_policy(cfg, labels)
    groups, ops = start.group_names, start.op_names
    noise = p_on_of([replay(cfg, labels, r) for r in range(args.replicates)])
    learned = learned_p_on(runs, groups, ops)
    result = {"runs": args.runs, "config": runs[0]["config"], "overrides": runs[0]["overrides"], "replay_set": args.set,
              "tra_lr": cfg.augment.tra.lr, "tra_beta1": cfg.augment.tra.beta1,
              "start": summary(p_on_of([start]), groups, ops), "noise": summary(noise, groups, ops),
              "learned": {**summary(learned, groups, ops), "outside_noise": outside_noise(learned, noise, groups, ops)}}
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    for name in ("start", "noise", "learned"):
        block = result[name]
        print(f"{name} (n={block['n']}): ops a patch " + ", ".join(
            f"{g} {v['mean']:.2f} [{v['min']:.2f}, {v['max']:.2f}]" for g, v in block["ops_per_patch"].items()))
    for group, outside in result["learned"]["outside_noise"].items():
        print(f"  {group}, outside the noise band of {len(runs)} replicates' mean: " + ", ".join(
            f"{op} {v['learned']:.2f} [{low:.2f}, {high:.2f}]" for op, v in outside.items()
            for low, high in [v["noise_band"]]))

if __name__ == "__main__":
    main()
