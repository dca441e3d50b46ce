"""The op contract: a spec (bins with magnitude bands), `sample` params, `apply` to image or mask, `invert` predictions.

Params are a float tensor (N, P) returned by `sample` and passed back to `apply` / `invert`; ops keep nothing on
`self`, so replay, inversion and meta-learning never see hidden state. Each op's `apply` is the exact identity on
samples whose params are the identity (bin 0).
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import Literal

import torch

from augsearch.errors import AugsearchError


class UnknownOpError(AugsearchError):
    """An op name that the registry does not hold."""


class OpInputError(AugsearchError):
    """Bad bins, params or tensors given to an op or to the augmentation pipeline."""


@dataclass(frozen=True)
class BinSpec:
    """One categorical bin: magnitudes drawn uniformly from [low, high].

    sign: +1 / -1 the direction of a direction-bearing op (see the registry table); 0 a bin without a direction
    (off, flips, blur/sharpen, noise, low resolution). With `reference_signs=True` every signed bin draws its sign
    at random per sample instead, as the reference code does.
    """

    label: str
    low: float
    high: float
    sign: int


@dataclass(frozen=True)
class OpSpec:
    name: str
    kind: Literal["spatial", "intensity"]
    dims: tuple[int, ...]
    bins: tuple[BinSpec, ...]
    tolerance: float  # max abs round-trip error of apply+invert on smooth images, central region (0 = exact)
    description: str


OFF = BinSpec("off", 0.0, 0.0, 0)


@functools.lru_cache(maxsize=256)
def _bin_tables(spec: OpSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(low, width, sign) tensors (n_bins,) on `device`, cached so that sampling makes no host copies per call."""
    low = torch.tensor([b.low for b in spec.bins], dtype=torch.float32, device=device)
    high = torch.tensor([b.high for b in spec.bins], dtype=torch.float32, device=device)
    sign = torch.tensor([float(b.sign) for b in spec.bins], dtype=torch.float32, device=device)
    return low, high - low, sign


def make_generator(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator, or a freshly (non-deterministically) seeded one on `device`."""
    if generator is not None:
        if generator.device.type != torch.device(device).type:
            raise OpInputError(
                f"generator on {generator.device} but tensors on {device}; expected a torch.Generator on the "
                f"tensors' device: pass torch.Generator(device={str(device)!r}).manual_seed(seed)")
        return generator
    gen = torch.Generator(device=device)
    gen.seed()
    return gen


def spatial_view(t: torch.Tensor) -> tuple[int, ...]:
    """Broadcast shape (N, 1, ..., 1) for per-sample scalars against (N, C, *S)."""
    return (t.shape[0],) + (1,) * (t.dim() - 1)


class Op(abc.ABC):
    """Base class. Subclasses set `spec`, `n_params` and implement `_params`, `apply` (and `invert` if spatial)."""

    spec: OpSpec
    n_params: int

    @property
    def name(self) -> str:
        return self.spec.name

    def sample(self, bins: torch.Tensor, generator: torch.Generator | None = None,
               reference_signs: bool = False) -> torch.Tensor:
        """Params (N, P) float32 for bin indices `bins` (N,) int64; magnitudes uniform in each bin's band."""
        if bins.dim() != 1 or bins.dtype not in (torch.int64, torch.int32):
            raise OpInputError(f"{self.name}: expected bins as a 1-D integer tensor (N,), got {tuple(bins.shape)} "
                               f"{bins.dtype}; pass one bin index per sample")
        bins = bins.long()
        if bins.device.type == "cpu" and bins.numel() and (bins.min() < 0 or bins.max() >= len(self.spec.bins)):
            raise OpInputError(f"{self.name}: bin indices must lie in [0, {len(self.spec.bins) - 1}], got "
                               f"{bins.min().item()}..{bins.max().item()}; see the bins table in "
                               "augsearch.ops.registry")
        gen = make_generator(bins.device, generator)
        low, width, sign = _bin_tables(self.spec, bins.device)
        u = torch.rand(bins.shape, generator=gen, device=bins.device)
        mag = low[bins] + u * width[bins]
        sign = sign[bins]
        if reference_signs:
            coin = torch.rand(bins.shape, generator=gen, device=bins.device) < 0.5
            sign = torch.where(sign != 0, torch.where(coin, 1.0, -1.0), sign)
        return self._params(bins, mag, sign, gen)

    def identity_params(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Params (n, P) of bin 0."""
        zeros = torch.zeros(n, device=device)
        return self._params(torch.zeros(n, dtype=torch.long, device=device), zeros, zeros, None)

    @abc.abstractmethod
    def _params(self, bins: torch.Tensor, mag: torch.Tensor, sign: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        """Params (N, P) from each sample's bin, magnitude and sign."""

    @abc.abstractmethod
    def apply(self, x: torch.Tensor, params: torch.Tensor, target: Literal["image", "mask"] = "image",
              stats: torch.Tensor | None = None) -> torch.Tensor:
        """image (N, C, *S) float or mask (N, *S) int64 -> same shape. `stats` (N, C, 4): image-level
        (min, max, mean, std) for intensity ops that use them; defaults to the patch's own."""

    def invert(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Map predictions (N, K, *S) of an `apply`-ed input back to the original geometry (identity here)."""
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.spec.bins)} bins)"
