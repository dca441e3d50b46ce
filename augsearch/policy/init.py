"""Initial policies: the METHOD 3.3 tables for TRA, the METHOD 3.4 starts for TEA, and `make_policy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from augsearch.errors import PolicyError
from augsearch.ops.geometry import rot90_unavailable, tea_turns_unavailable
from augsearch.ops.registry import get_op, list_ops
from augsearch.ops.tea import tea_pool
from augsearch.policy.core import ZERO_LOGIT, Policy, Sampling, TeaEntryLike
from augsearch.policy.groups import normalise_labels, resolve_groups

INITS: tuple[str, ...] = ("identity", "uniform-0.1", "nnunet", "deepmedic", "uniform", "randaugment", "trivialaugment")


# Inits that start a learnable (independently sampled) policy from a baseline sampler's per-op marginals.
BASELINE_INITS: tuple[str, ...] = ("randaugment", "trivialaugment")


TEA_INITS: tuple[str, ...] = ("flips", "single-flips", "identity", "uniform")


# Total probability the other TEA entries share under tea_init="identity".
TEA_IDENTITY_FLOOR = 0.01


# METHOD 3.3: probability that an op is applied, split evenly over its available bins.
# "nnunet" is the reference's --org 2 (U-Net, mimics nnU-Net's defaults), "deepmedic" its --org 3.
INIT_TABLES: dict[str, dict[str, float]] = {
    "nnunet": {
        "scale": 0.2, "rotate_yz": 0.1, "rotate_xz": 0.1, "rotate_xy": 0.1,
        "flip_x": 0.5, "flip_y": 0.5, "flip_z": 0.5,
        "gamma": 0.3, "inverse_gamma": 0.1, "intensity_shift": 0.05, "intensity_scale": 0.15, "contrast": 0.15,
        "blur_sharpen": 0.2, "noise": 0.1, "low_resolution": 0.1,
    },
    "deepmedic": {
        "scale": 0.2, "rotate_yz": 0.2, "rotate_xz": 0.2, "rotate_xy": 0.2,
        "flip_x": 0.5, "flip_y": 0.05, "flip_z": 0.05,
        "gamma": 0.05, "inverse_gamma": 0.05, "intensity_shift": 0.15, "intensity_scale": 0.05, "contrast": 0.05,
        "blur_sharpen": 0.05, "noise": 0.05, "low_resolution": 0.05,
    },
}


def _split_on(p_on: float, bins_available: Sequence[bool]) -> list[float]:
    """Bin probabilities: P(off) = 1 - p_on and p_on split evenly over the available non-off bins."""
    n = sum(bins_available[1:])
    if n == 0:
        return [1.0] + [0.0] * (len(bins_available) - 1)
    return [1.0 - p_on] + [p_on / n if ok else 0.0 for ok in bins_available[1:]]


def _init_probs(init: str, name: str, bins_available: Sequence[bool]) -> list[float]:
    if init == "identity":
        return _split_on(0.0, bins_available)
    if init == "uniform-0.1":
        return _split_on(0.1, bins_available)
    if init == "uniform":
        n = sum(bins_available)
        return [1.0 / n if ok else 0.0 for ok in bins_available]
    table = INIT_TABLES[init]
    if name not in table:
        raise PolicyError(f"init {init!r} has no probability for op {name!r} (its table covers {sorted(table)}).")
    return _split_on(table[name], bins_available)


def logits_from_probs(probs: Sequence[float]) -> list[float]:
    """log(p), with ZERO_LOGIT for p = 0, so that softmax returns the probabilities."""
    return [math.log(p) if p > 0 else ZERO_LOGIT for p in probs]


def tea_init_probs(entries: Sequence[TeaEntryLike], dims: int, tea_init: str) -> list[float]:
    """TEA probabilities per METHOD 3.4.

    "flips": identity, single flips, 180-degree rotations and flip-all at 0.1 each (those present), the others
    share the rest. "single-flips": identity and single flips share 0.8, the others share 0.2 (the reference's
    --orgts 4 in 3D). "identity": identity 1 - TEA_IDENTITY_FLOOR, the others share the floor. "uniform": equal.
    """
    n = len(entries)
    if tea_init == "uniform":
        return [1.0 / n] * n
    if tea_init == "identity":
        chosen, mass = [0], 1.0 - TEA_IDENTITY_FLOOR
    elif tea_init == "single-flips":
        chosen = [0] + [e.id for e in entries if e.op.startswith("flip_") and len(e.op) == len("flip_x")]
        mass = 0.8
    elif tea_init == "flips":
        chosen = [0] + [e.id for e in entries if _is_flip_or_half_turn(e)]
        mass = 0.1 * len(chosen)
    else:
        raise PolicyError(f"tea_init must be one of {', '.join(TEA_INITS)}; got {tea_init!r}.")
    rest = n - len(chosen)
    if rest == 0:
        return [1.0 / n] * n
    each, other = mass / len(chosen), (1.0 - mass) / rest
    chosen_set = set(chosen)
    return [each if i in chosen_set else other for i in range(n)]


def tea_available_mask(entries: Sequence[TeaEntryLike], ops: Sequence[str] | None = None,
                       exclude: Sequence[str] = ()) -> torch.Tensor:
    """(A,) bool: the pool entries kept when TRA is limited to `ops` (None: all) and the entries named in `exclude`
    are left out. The identity always stays; flip_all needs every flip of the pool among `ops`."""
    names = [e.name for e in entries]
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise PolicyError(f"TEA entries {unknown} are not in the {len(names)}-entry pool; valid names: "
                          f"{', '.join(names)}.")
    if names[0] in exclude:
        raise PolicyError("the TEA identity (entry 0) cannot be excluded; every TEA distribution needs it.")
    flips = {e.op for e in entries if e.op.startswith("flip_") and e.op != "flip_all"}
    kept = set(ops) if ops is not None else {e.op for e in entries}
    if flips <= kept:
        kept.add("flip_all")
    kept.add(entries[0].op)
    return torch.tensor([e.op in kept and e.name not in exclude for e in entries], dtype=torch.bool)


def _is_flip_or_half_turn(entry: TeaEntryLike) -> bool:
    if entry.op.startswith("flip_"):
        return True
    return entry.op.startswith("rotate_") and entry.value is not None and abs(abs(float(entry.value)) - 180.0) < 1e-9


def make_policy(
    dims: int,
    label_names: Mapping[str, int] | Sequence[str],
    *,
    init: str = "uniform-0.1",
    groups: Mapping[str, Sequence[str]] | None = None,
    class_specific: bool = True,
    patch_size: Sequence[int] | None = None,
    tea_init: str = "flips",
    sampling: Sampling = "independent",
    randaugment_n: int = 2,
    randaugment_m: int = 2,
    tea_top_k: int = 4,
    tau: float = 1.0,
    ops: Sequence[str] | None = None,
    tea_exclude: Sequence[str] = (),
) -> Policy:
    """A policy over the registry's ops for `dims`, every group starting from the same probabilities.

    init (METHOD 3.3): "identity" (bin 0 with probability 1), "uniform-0.1" (P(on) = 0.1 per op), "nnunet" (--org 2),
    "deepmedic" (--org 3), "uniform" (equal logits); P(on) is split evenly over an op's available bins and logits are
    log(p), so softmax reproduces the probabilities. "randaugment" and "trivialaugment" start an independently sampled
    policy from that sampler's per-op marginals (with randaugment_n, randaugment_m): each op is applied as often and
    at the same bins, but ops are drawn independently, so the number applied varies. With a baseline `sampling`
    ("randaugment", "trivialaugment", "none") the logits are set to that sampler's per-op marginals instead (they
    describe it; sampling ignores them).
    patch_size makes rot90 bins and TEA quarter/half turns unavailable in non-square planes. ops restricts the op set
    (registry order kept) and the TEA pool to the entries of those ops; tea_exclude removes further TEA entries by name
    (`tea_available_mask`).
    """

    if dims not in (2, 3):
        raise PolicyError(f"dims must be 2 or 3, got {dims!r}.")
    if init not in INITS:
        raise PolicyError(f"init must be one of {', '.join(INITS)}; got {init!r}.")
    if tea_init not in TEA_INITS:
        raise PolicyError(f"tea_init must be one of {', '.join(TEA_INITS)}; got {tea_init!r}.")
    if patch_size is not None and len(patch_size) != dims:
        raise PolicyError(f"patch_size must have {dims} entries for dims={dims}, got {list(patch_size)}.")
    names = list_ops(dims)
    if ops is not None:
        unknown = [name for name in ops if name not in names]
        if unknown:
            raise PolicyError(f"ops {unknown} are not available in {dims}D; valid ops: {', '.join(names)}.")
        names = [name for name in names if name in set(ops)]
    specs = [get_op(name).spec for name in names]
    labels = normalise_labels(label_names)
    group_labels = resolve_groups(labels, groups, class_specific=class_specific)

    max_bins = max(len(spec.bins) for spec in specs)
    available = torch.arange(max_bins).unsqueeze(0) < torch.tensor([len(s.bins) for s in specs]).unsqueeze(1)
    for op, index in rot90_unavailable(specs, patch_size):
        available[names.index(op), index] = False

    entries = tea_pool(dims)
    tea_logits = torch.tensor(logits_from_probs(tea_init_probs(entries, dims, tea_init)), dtype=torch.float32)
    tea_available = tea_available_mask(entries, ops, tea_exclude)
    tea_available[tea_turns_unavailable(entries, patch_size)] = False
    settings = dict(
        dims=dims,
        op_specs=specs,
        group_labels=group_labels,
        label_names=labels,
        tea_entries=entries,
        tea_logits=tea_logits,
        available=available,
        tea_available=tea_available,
        sampling=sampling,
        randaugment_n=randaugment_n,
        randaugment_m=randaugment_m,
        tea_top_k=tea_top_k,
        tau=tau,
    )
    policy = Policy(**settings)
    if sampling == "independent" and init not in BASELINE_INITS:
        rows = [_init_probs(init, spec.name, available[k, : len(spec.bins)].tolist()) for k, spec in enumerate(specs)]
    else:
        describes = policy if sampling != "independent" else Policy(**{**settings, "sampling": init})
        marginals = describes.baseline_marginals()
        rows = [marginals[k, : len(spec.bins)].tolist() for k, spec in enumerate(specs)]
    logits = torch.zeros(len(group_labels), len(specs), max_bins)
    for k, row in enumerate(rows):
        logits[:, k, : len(row)] = torch.tensor(logits_from_probs(row))
    with torch.no_grad():
        policy.tra_logits.copy_(logits)
    return policy
