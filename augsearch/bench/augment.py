"""Augmented patches per second under a full policy and under the nnU-Net-like preset, augmentation time relative to
one U-Net training step, and the preset's operator calls per batch (kernel launches on a GPU)."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small patches and batches (CI-sized, CPU seconds)")
    parser.add_argument("--repeats", type=int, default=5)


def _case(dims: int, quick: bool, repeats: int, device) -> dict[str, Any]:
    import torch

    from augsearch.augment import augment_batch, required_margin, unavailable_bins
    from augsearch.bench import peak_memory_mb, time_fn
    from augsearch.model import UNet
    from augsearch.ops import get_op, list_ops
    from augsearch.policy.presets import policy_from_file_or_preset

    patch, batch = {(2, False): ((128, 128), 16), (3, False): ((64, 64, 64), 2),
                    (2, True): ((32, 32), 4), (3, True): ((16, 16, 16), 2)}[(dims, quick)]
    names = list_ops(dims)
    margin = required_margin(patch, names)
    crop = tuple(p + 2 * margin for p in patch)
    generator = torch.Generator(device=device).manual_seed(0)
    image = torch.randn((batch, 1) + crop, device=device, generator=generator)
    mask = torch.randint(0, 3, (batch,) + crop, device=device, generator=generator)
    counts = torch.tensor([len(get_op(n).spec.bins) for n in names], device=device)
    allowed = torch.ones(len(names), int(counts.max()), dtype=torch.bool, device=device)
    for j, name in enumerate(names):
        allowed[j, counts[j]:] = False
        allowed[j, unavailable_bins(name, patch)] = False

    def augment() -> None:
        # Full policy: every op's bin drawn uniformly over its available bins, fresh each call.
        probs = allowed.float().expand(batch, -1, -1).reshape(batch * len(names), -1)
        bins = torch.multinomial(probs, 1, generator=generator).view(batch, len(names))
        augment_batch(image, mask, bins, names, patch, generator=generator)

    # The nnU-Net-like preset: most ops off in most samples, as in a fixed-policy run.
    preset = policy_from_file_or_preset("nnunet", dims, ["background", "fg"], class_specific=False,
                                        patch_size=patch).to(device)
    groups = torch.zeros(batch, dtype=torch.long, device=device)

    def augment_preset() -> None:
        bins = preset.sample_tra(groups, generator)
        augment_batch(image, mask, bins, preset.op_names, patch, generator=generator)

    model = UNet(dims, 1, 3, base_features=8 if quick else 16, depth=3 if quick else 4).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn((batch, 1) + patch, device=device, generator=generator)
    y = torch.randint(0, 3, (batch,) + patch, device=device, generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        out = out[0] if isinstance(out, list) else out
        torch.nn.functional.cross_entropy(out, y).backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    augment_ms = time_fn(augment, device, repeats=repeats)
    augment_memory = peak_memory_mb(device)
    preset_ms = time_fn(augment_preset, device, repeats=repeats)
    preset_calls = _operator_calls(augment_preset, repeats)
    step_ms = time_fn(step, device, repeats=repeats)
    return {"dims": dims, "patch_size": list(patch), "crop_size": list(crop), "batch_size": batch,
            "ops": names, "augment_ms": augment_ms, "patches_per_s": batch * 1e3 / augment_ms,
            "train_step_ms": step_ms, "augment_to_step_ratio": augment_ms / step_ms,
            "nnunet_preset_augment_ms": preset_ms, "nnunet_preset_to_step_ratio": preset_ms / step_ms,
            "nnunet_preset_operator_calls": preset_calls,
            "augment_peak_memory_mb": augment_memory}


def _operator_calls(fn, repeats: int) -> float:
    """Mean number of innermost ATen operator calls per call of `fn`: on a GPU each is at least one kernel launch,
    which is what small-patch augmentation costs there; counted the same on any device."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(repeats):
            fn()
    leaves = [e for e in prof.key_averages()
              if e.key.startswith("aten::") and e.cpu_time_total == e.self_cpu_time_total]  # calls nothing below
    return sum(e.count for e in leaves) / repeats


def run(args: argparse.Namespace) -> dict[str, Any]:
    from augsearch.bench import environment
    from augsearch.devices import resolve_device

    device = resolve_device(args.device)
    return {"benchmark": "augment", "environment": environment(device),
            "results": [_case(2, args.quick, args.repeats, device), _case(3, args.quick, args.repeats, device)]}
