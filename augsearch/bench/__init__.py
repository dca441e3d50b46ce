"""Benchmarks: `augsearch bench NAME`. Each module here has `add_arguments(parser)` and `run(args) -> dict`.

Figures are ratios measured side by side in one process, never absolute thresholds in tests.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any


def time_fn(fn: Callable[[], Any], device: "torch.device", *, warmup: int = 2, repeats: int = 5) -> float:  # noqa: F821
    """Median wall time of `fn()` in milliseconds, synchronising CUDA around each call."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def time_round_robin(
    fns: dict[str, Callable[[], Any]], device: "torch.device", *, warmup: int = 1, repeats: int = 5  # noqa: F821
) -> dict[str, float]:
    """Median wall time (ms) of each function, timed in turns (a, b, c, a, b, c, ...) so that a change in the
    machine's load during the run affects every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_fn(fn, device, warmup=0, repeats=1))
    return {name: sorted(times)[len(times) // 2] for name, times in samples.items()}


def peak_memory_mb(device: "torch.device") -> float | None:  # noqa: F821
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def environment(device: "torch.device") -> dict[str, Any]:  # noqa: F821
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info
