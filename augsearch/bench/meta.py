"""Milliseconds per iteration: a plain training step against a full joint iteration (TRA meta-step, TEA step,
segmenter step) per meta-gradient backend, 2D and 3D, measured side by side in one process."""

from __future__ import annotations

import argparse
from typing import Any

from augsearch.errors import AugsearchError

SIZES = {  # (dims, quick) -> patch size, batch size (train and validation), U-Net width, depth
    (2, False): ([128, 128], 8, 16, 4),
    (3, False): ([64, 64, 64], 2, 16, 4),
    (2, True): ([32, 32], 4, 8, 3),
    (3, True): ([16, 16, 16], 2, 4, 2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small patches and batches (CI-sized, CPU seconds)")
    parser.add_argument("--backends", nargs="+", default=["jvp", "fd", "functional", "higher"])
    parser.add_argument("--dims", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tea-views", type=int, default=8)
    parser.add_argument("--patch", nargs="+", type=int, default=None,
                        help="patch size overriding the default of each --dims (one edge per axis)")
    parser.add_argument("--batch-size", type=int, default=None, help="train and validation batch size override")


def _random_batch(patch: list[int], batch: int, margin: int, device, generator):
    import torch

    from augsearch.data.sampler import Batch

    crop = [p + 2 * margin for p in patch]
    image = torch.randn(batch, 1, *crop, device=device, generator=generator)
    mask = torch.randint(0, 3, (batch, *crop), device=device, generator=generator)
    anchor = torch.arange(batch, device=device) % 3
    return Batch(image=image, mask=mask, anchor_class=anchor, case_index=torch.zeros_like(anchor))


def _case(dims: int, args: argparse.Namespace, device) -> dict[str, Any]:
    import torch

    from augsearch.augment import required_margin
    from augsearch.bench import peak_memory_mb, time_round_robin
    from augsearch.config import AugmentConfig, LossConfig, TeaSearchConfig, TrainConfig, TraSearchConfig
    from augsearch.learn.joint import JointRuntime, JointStep
    from augsearch.losses import batch_loss, deep_supervision_loss
    from augsearch.model import UNet
    from augsearch.ops.tea import tea_margin, tea_pool
    from augsearch.policy.init import make_policy

    patch, batch_size, width, depth = SIZES[(dims, args.quick)]
    if args.patch is not None:
        if len(args.patch) != dims:
            raise AugsearchError(f"--patch has {len(args.patch)} edges for a {dims}D case; give {dims}, or one --dims")
        patch = list(args.patch)
    batch_size = args.batch_size or batch_size
    labels = {"background": 0, "organ": 1, "lesion": 2}
    rare = torch.tensor([False, True, True], device=device)
    loss_cfg = LossConfig()
    generator = torch.Generator(device=device).manual_seed(0)
    pool = tea_pool(dims)

    def build(backend: str | None) -> tuple[JointStep, Any]:
        torch.manual_seed(0)
        model = UNet(dims, 1, 3, base_features=width, depth=depth).to(device)
        policy = make_policy(dims, labels, init="nnunet", patch_size=patch).to(device)
        runtime = JointRuntime(
            model=model, policy=policy,
            optimizer=torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True),
            tra_optimizer=torch.optim.Adam([policy.tra_logits], lr=1e-2) if backend else None,
            tea_optimizer=torch.optim.Adam([policy.tea_logits], lr=1e-2) if backend else None,
            per_sample_loss=lambda logits, y: deep_supervision_loss(logits, y, loss_cfg, rare),
            outer_loss=lambda logits, y: batch_loss(logits, y, "ce_dice", [1, 2]),
            num_classes=3, fg_classes=[1, 2],
        )
        augment = AugmentConfig(tra=TraSearchConfig(backend=backend or "jvp"),
                                tea=TeaSearchConfig(learn=True, views=args.tea_views))
        step = JointStep(runtime, augment, TrainConfig(patch_size=patch), loss_cfg)
        return step, policy

    train = _random_batch(patch, batch_size, required_margin(patch, build(None)[1].op_names), device, generator)
    val_margin = tea_margin(dims, torch.arange(len(pool)), patch)
    val = _random_batch(patch, batch_size, val_margin, device, generator)
    tea = _random_batch(patch, 1, val_margin, device, generator)

    def iteration(step: JointStep, meta: bool):
        return lambda: step.run(train, val if meta else None, tea if meta else None, inner_lr=1e-2,
                                generator=generator)

    results: dict[str, Any] = {"dims": dims, "patch_size": patch, "batch_size": batch_size,
                               "val_batch_size": batch_size, "tea_views": args.tea_views}
    # Memory first, one candidate at a time (peak statistics are per device); then times in turns.
    steps = {"plain": build(None)[0], **{backend: build(backend)[0] for backend in args.backends}}
    calls = {name: iteration(step, name != "plain") for name, step in steps.items()}
    memory = {}
    for name, call in calls.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        call()
        memory[name] = peak_memory_mb(device)
    times = time_round_robin(calls, device, repeats=args.repeats)
    results["plain_ms"] = times["plain"]
    results["plain_peak_memory_mb"] = memory["plain"]
    for backend in args.backends:
        results[backend] = {"joint_ms": times[backend], "ratio_to_plain": times[backend] / times["plain"],
                            "peak_memory_mb": memory[backend]}
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    from augsearch.bench import environment
    from augsearch.devices import resolve_device

    device = resolve_device(args.device)
    return {"benchmark": "meta", "environment": environment(device),
            "results": [_case(dims, args, device) for dims in args.dims]}
