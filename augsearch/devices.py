"""Device names from configs and command lines: 'auto' picks CUDA when torch sees a GPU, else the CPU."""

from __future__ import annotations

import torch

from augsearch.errors import AugsearchError


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """'auto' (or None), 'cpu', 'cuda' or 'cuda:N'; asking for CUDA without a GPU is an error naming `option`."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AugsearchError(f"{option} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AugsearchError(f"{option} {name} asked for CUDA, but torch sees no GPU; use cpu or auto")
    return device
