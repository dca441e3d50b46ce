"""TTA prediction cost: Z views in one batched pass vs Z plain sliding-window passes, and the transforms' share."""

from __future__ import annotations

import argparse
from typing import Any

# Views measured: transforms that keep the grid (flips, 180-degree turns), and the same count with affine entries
# (small rotations, scale) that enlarge the grid (tea_margin).
GRID_VIEWS = ("identity", "flip_x", "flip_y", "flip_z", "flip_all")
AFFINE_OPS = ("rotate_xy", "scale")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small volume and network (seconds on a CPU)")
    parser.add_argument("--size", type=int, default=None, help="volume edge in voxels (default 128, quick 40)")
    parser.add_argument("--window", type=int, default=None, help="window edge (default 64, quick 32)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per model call")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median; default 5, quick 3)")


def _policy_with(entries: list[int], dims: int, labels: list[str]):
    """A policy whose top-K TEA entries are exactly `entries`, with equal weights."""
    import torch

    from augsearch.policy.core import ZERO_LOGIT
    from augsearch.policy.init import make_policy

    policy = make_policy(dims, labels, tea_top_k=len(entries))
    logits = torch.full_like(policy.tea_logits, ZERO_LOGIT)
    logits[entries] = 0.0
    return policy.replace(tea_logits=logits)


def _pick(pool, names: tuple[str, ...], affine_ops: tuple[str, ...], count: int) -> list[int]:
    """Pool ids: the named grid-preserving entries, then entries of the affine ops, `count` in all."""
    by_name = {entry.name: entry.id for entry in pool}
    ids = [by_name[name] for name in names if name in by_name]
    ids += [entry.id for entry in pool if entry.op in affine_ops and entry.id not in ids]
    return ids[:count]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from augsearch.bench import environment, peak_memory_mb, time_fn
    from augsearch.devices import resolve_device
    from augsearch.model import UNet
    from augsearch.ops.tea import tea_apply, tea_invert, tea_pool
    from augsearch.predict.sliding_window import sliding_window_predict
    from augsearch.predict.tta import predict_tta, view_padding

    device = resolve_device(args.device)
    size = args.size or (40 if args.quick else 128)
    window = (args.window or (32 if args.quick else 64),) * 3
    repeats = args.repeats or (3 if args.quick else 5)
    dims, labels = 3, ["background", "organ", "lesion"]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = UNet(dims, 1, len(labels), base_features=4 if args.quick else 16, depth=3 if args.quick else 4)
    model = model.to(device).eval()
    image = torch.randn(1, *(size,) * dims, generator=generator).to(device)
    pool = tea_pool(dims)

    def plain() -> None:
        sliding_window_predict(model, image[None], window, batch_size=args.batch_size)

    results: dict[str, Any] = {"environment": environment(device), "size": size, "window": list(window),
                               "batch_size": args.batch_size, "settings": {}}
    grid_ids = _pick(pool, GRID_VIEWS, (), len(GRID_VIEWS))
    mixed_ids = _pick(pool, GRID_VIEWS[:3], AFFINE_OPS, len(grid_ids))
    for setting, ids in (("grid_preserving", grid_ids), ("with_affine", mixed_ids)):
        policy = _policy_with(ids, dims, labels)
        z = len(ids)
        id_tensor = torch.tensor(ids, device=device)
        before, after = view_padding(image.shape[1:], ids, dims)
        padded = torch.nn.functional.pad(image, [p for a in reversed(range(dims)) for p in (before[a], after[a])])
        views = padded.unsqueeze(0).expand(z, *padded.shape).contiguous()
        maps = torch.rand(z, len(labels), *padded.shape[1:], generator=generator).to(device)

        def tta(policy=policy) -> None:
            predict_tta(model, image, policy, window=window, batch_size=args.batch_size)

        def transforms(views=views, maps=maps, id_tensor=id_tensor) -> None:
            tea_apply(views, id_tensor, dims)
            tea_invert(maps, id_tensor, dims)

        # Plain timed right before each TTA setting, so both see the same machine state.
        plain_ms = time_fn(plain, device, warmup=1, repeats=repeats)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tta_ms = time_fn(tta, device, warmup=1, repeats=repeats)
        memory = peak_memory_mb(device)
        transform_ms = time_fn(transforms, device, warmup=1, repeats=repeats)
        results["settings"][setting] = {
            "views": [pool[i].name for i in ids],
            "view_grid": list(padded.shape[1:]),
            "plain_ms": plain_ms,
            "tta_ms": tta_ms,
            "z_times_plain_ms": z * plain_ms,
            "ratio": tta_ms / (z * plain_ms),
            "transform_ms": transform_ms,
            "transform_share": transform_ms / tta_ms,
            "peak_memory_mb": memory,
        }
    results["goals"] = {"ratio": "<= 1.05 on GPU (grid_preserving)", "transform_share": "< 0.05"}
    return results
