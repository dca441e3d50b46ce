"""Training steps per second and peak memory of the default 2D and 3D U-Net (plain CE + Dice step)."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small patches and batches (CI-sized, CPU seconds)")
    parser.add_argument("--repeats", type=int, default=5)


def _case(dims: int, quick: bool, device) -> dict[str, Any]:
    import torch

    from augsearch.bench import peak_memory_mb, time_fn
    from augsearch.config import LossConfig
    from augsearch.losses import per_sample_loss
    from augsearch.model import UNet

    patch, batch = {(2, False): ([128, 128], 16), (3, False): ([64, 64, 64], 2),
                    (2, True): ([64, 64], 4), (3, True): ([32, 32, 32], 1)}[(dims, quick)]
    model = UNet(dims, 1, 3, base_features=16 if not quick else 8, depth=4 if not quick else 3).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 1, *patch, device=device, generator=generator)
    y = torch.randint(0, 3, (batch, *patch), device=device, generator=generator)
    rare = torch.tensor([False, True, True], device=device)
    loss_cfg = LossConfig()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        per_sample_loss(model(x), y, loss_cfg, rare).mean().backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_fn(step, device)
    return {"dims": dims, "patch_size": patch, "batch_size": batch, "ms_per_step": ms,
            "steps_per_s": 1e3 / ms, "peak_memory_mb": peak_memory_mb(device)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from augsearch.bench import environment
    from augsearch.devices import resolve_device

    device = resolve_device(args.device)
    return {"benchmark": "train", "environment": environment(device),
            "results": [_case(2, args.quick, device), _case(3, args.quick, device)]}
