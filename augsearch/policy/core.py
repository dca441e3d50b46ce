"""Augmentation policies: per class group, a categorical over each op's bins (TRA), and one categorical over the
TEA pool. Sampling is vectorised over the batch; straight-through weights (policy/gumbel.py) carry the policy
gradient.

Probabilities of padded bins (ops have different bin counts) and of unavailable bins (for example rot90 in a plane
where the patch is not square) are exactly 0: their logits are replaced by -inf before every softmax and draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor

from augsearch.errors import PolicyError
from augsearch.ops.geometry import rot90_unavailable, tea_turns_unavailable
from augsearch.policy.groups import (
    AGNOSTIC_GROUP,
    DEFAULT_GROUPS,
    normalise_labels,
    resolve_groups,
)
from augsearch.policy.gumbel import (
    conditional_gumbel,
    gumbel_max,
    log_mask,
    score_function,
    straight_through,
)

Sampling = Literal["independent", "randaugment", "trivialaugment", "none"]


SAMPLINGS: tuple[str, ...] = ("independent", "randaugment", "trivialaugment", "none")

# How a policy gradient reaches the TRA logits through the per-sample weights (policy/gumbel.py)
ESTIMATORS: tuple[str, ...] = ("straight_through", "reinforce")


# Logit of a bin whose probability is exactly 0 but which stays available: exp(-1e4) is 0 in float32 and float64,
# and unlike -inf it survives JSON.
ZERO_LOGIT = -1.0e4




class BinLike(Protocol):
    label: str
    low: float
    high: float
    sign: int


class OpSpecLike(Protocol):
    name: str
    kind: str
    bins: Sequence[BinLike]


class TeaEntryLike(Protocol):
    id: int
    name: str
    op: str
    value: float | None
    spatial: bool


def magnitude_levels(bins: Sequence[BinLike], available: Sequence[bool]) -> list[list[int]]:
    """Bin indices per magnitude level of one op, weakest level first.

    Magnitude level m (1-based) is the m-th distinct (low, high) range among the op's available non-off bins, in
    registry bin order (the registry lists bins from weak to strong). The bins of one level share the range and
    differ only in sign (direction), so a level holds one bin for unsigned ops and two for signed ones.
    """
    levels: dict[tuple[float, float], list[int]] = {}
    for index in range(1, len(bins)):
        if available[index]:
            levels.setdefault((float(bins[index].low), float(bins[index].high)), []).append(index)
    return list(levels.values())


def _fmt_prob(p: float) -> str:
    """.31 style: two decimals without the leading zero."""
    text = f"{p:.2f}"
    return text[1:] if text.startswith("0") else text


class Policy(torch.nn.Module):
    """TRA categoricals per class group and op, and the TEA categorical.

    Parameters: `tra_logits` (G, n_ops, max_bins) and `tea_logits` (A,). Buffers (not saved in state_dict, rebuilt
    from the spec): `available` (n_ops, max_bins) bool, `tea_available` (A,) bool, `label_lut` (max label + 1,)
    int64 mapping a label value to its group index (-1: unknown label).
    """

    tra_logits: torch.nn.Parameter
    tea_logits: torch.nn.Parameter

    def __init__(
        self,
        *,
        dims: int,
        op_specs: Sequence[OpSpecLike],
        group_labels: Mapping[str, Sequence[int]],
        label_names: Mapping[str, int],
        tea_entries: Sequence[TeaEntryLike],
        tra_logits: Tensor | None = None,
        tea_logits: Tensor | None = None,
        available: Tensor | None = None,
        tea_available: Tensor | None = None,
        sampling: Sampling = "independent",
        randaugment_n: int = 2,
        randaugment_m: int = 2,
        tea_top_k: int = 4,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise PolicyError(f"dims must be 2 or 3, got {dims!r}.")
        if sampling not in SAMPLINGS:
            raise PolicyError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}.")
        if randaugment_n < 1 or randaugment_m < 1:
            raise PolicyError(f"randaugment n and m must be >= 1, got n={randaugment_n}, m={randaugment_m}.")
        if not tau > 0:
            raise PolicyError(f"tau (Gumbel-softmax temperature) must be > 0, got {tau}.")
        self.dims = int(dims)
        self.op_specs = tuple(op_specs)
        self.op_names = tuple(spec.name for spec in self.op_specs)
        if len(set(self.op_names)) != len(self.op_names):
            raise PolicyError(f"op names must be unique, got {list(self.op_names)}.")
        if not self.op_names:
            raise PolicyError("a policy needs at least one op.")
        self.op_bins = tuple(tuple(spec.bins) for spec in self.op_specs)
        self.n_bins = tuple(len(bins) for bins in self.op_bins)
        if min(self.n_bins) < 1:
            raise PolicyError("every op needs at least its bin 0 ('off').")
        self.label_names = {str(name): int(value) for name, value in label_names.items()}
        self.group_names = tuple(group_labels)
        self.group_labels = {name: tuple(sorted(int(v) for v in values)) for name, values in group_labels.items()}
        self._check_groups()
        self.sampling: Sampling = sampling
        self.randaugment_n = int(randaugment_n)
        self.randaugment_m = int(randaugment_m)
        self.tau = float(tau)
        self.tea_entries = tuple(tea_entries)
        for position, entry in enumerate(self.tea_entries):
            if entry.id != position:
                raise PolicyError(f"TEA pool ids must be positions; entry {position} has id {entry.id}.")

        n_ops, max_bins, n_groups, n_tea = len(self.op_names), max(self.n_bins), len(self.group_names), len(
            self.tea_entries
        )
        padded = torch.arange(max_bins).unsqueeze(0) < torch.tensor(self.n_bins).unsqueeze(1)
        if available is None:
            available = padded
        available = available.to(torch.bool).cpu()
        if available.shape != (n_ops, max_bins):
            raise PolicyError(f"available must have shape {(n_ops, max_bins)}, got {tuple(available.shape)}.")
        available = available & padded
        if not bool(available[:, 0].all()):
            raise PolicyError("bin 0 ('off') of every op must stay available.")
        self.register_buffer("available", available, persistent=False)

        if tra_logits is None:
            tra_logits = torch.zeros(n_groups, n_ops, max_bins)
        if tuple(tra_logits.shape) != (n_groups, n_ops, max_bins):
            raise PolicyError(
                f"tra_logits must have shape (groups, ops, max_bins) = {(n_groups, n_ops, max_bins)}, "
                f"got {tuple(tra_logits.shape)}."
            )
        # Padding holds 0 so that every stored logit is finite; the mask makes it irrelevant.
        tra_logits = torch.where(padded, tra_logits.detach().to(torch.float32), torch.zeros(()))
        if not bool(torch.isfinite(tra_logits).all()):
            raise PolicyError("tra_logits must be finite; use a large negative logit for a probability of 0.")
        self.tra_logits = torch.nn.Parameter(tra_logits.clone())

        if tea_available is None:
            tea_available = torch.ones(n_tea, dtype=torch.bool)
        tea_available = tea_available.to(torch.bool).cpu()
        if tuple(tea_available.shape) != (n_tea,) or n_tea == 0 or not bool(tea_available[0]):
            raise PolicyError(f"tea_available must be ({n_tea},) bool with the identity (id 0) available.")
        self.register_buffer("tea_available", tea_available, persistent=False)
        if tea_logits is None:
            tea_logits = torch.zeros(n_tea)
        if tuple(tea_logits.shape) != (n_tea,):
            raise PolicyError(f"tea_logits must have shape ({n_tea},) (one per pool entry), "
                              f"got {tuple(tea_logits.shape)}.")
        if not bool(torch.isfinite(tea_logits).all()):
            raise PolicyError("tea_logits must be finite; use a large negative logit for a probability of 0.")
        self.tea_logits = torch.nn.Parameter(tea_logits.detach().to(torch.float32).clone())
        n_tea_available = int(tea_available.sum())
        if not 1 <= tea_top_k <= n_tea_available:
            raise PolicyError(f"tea_top_k must be in [1, {n_tea_available}] (available TEA entries), got {tea_top_k}.")
        self.tea_top_k = int(tea_top_k)

        lut = torch.full((max(self.label_names.values()) + 1,), -1, dtype=torch.int64)
        for index, group in enumerate(self.group_names):
            lut[list(self.group_labels[group])] = index
        self.register_buffer("label_lut", lut, persistent=False)

    # -- construction checks -------------------------------------------------------------------------------------

    def _check_groups(self) -> None:
        if not self.group_names:
            raise PolicyError("a policy needs at least one class group.")
        values = sorted(self.label_names.values())
        if min(values) < 0 or len(set(values)) != len(values):
            raise PolicyError(f"label values must be distinct non-negative integers, got {self.label_names}.")
        names_of = {value: name for name, value in self.label_names.items()}
        owner: dict[int, str] = {}
        for group, members in self.group_labels.items():
            for value in members:
                if value not in names_of:
                    raise PolicyError(
                        f"group {group!r} lists label value {value}, which is not a label "
                        f"(labels: {self.label_names})."
                    )
                if value in owner:
                    raise PolicyError(
                        f"label {names_of[value]!r} ({value}) is in both groups {owner[value]!r} and {group!r}; "
                        "every label must belong to exactly one group."
                    )
                owner[value] = group
        missing = [names_of[v] for v in values if v not in owner]
        if missing:
            raise PolicyError(
                f"labels {missing} belong to no group (groups: {dict(self.group_labels)}); every label must belong "
                "to exactly one group: add them to a group."
            )

    @property
    def tea_names(self) -> tuple[str, ...]:
        """Names of the TEA pool entries, by id."""
        return tuple(entry.name for entry in self.tea_entries)

    # -- probabilities ---------------------------------------------------------------------------------------------

    def masked_tra_logits(self) -> Tensor:
        """(G, n_ops, max_bins): tra_logits with -inf at padded and unavailable bins (carries the gradient)."""
        return self.tra_logits.masked_fill(~self.available, -math.inf)

    def masked_tea_logits(self) -> Tensor:
        """(A,): tea_logits with -inf at unavailable entries."""
        return self.tea_logits.masked_fill(~self.tea_available, -math.inf)

    def tra_probs(self) -> Tensor:
        """(G, n_ops, max_bins) probabilities; exactly 0 at padded and unavailable bins."""
        return torch.softmax(self.masked_tra_logits(), dim=-1)

    def tea_probs(self) -> Tensor:
        """(A,) probabilities over the TEA pool."""
        return torch.softmax(self.masked_tea_logits(), dim=-1)

    def p_on(self) -> Tensor:
        """(G, n_ops): probability that each op is applied, 1 - P(bin 0)."""
        return 1.0 - self.tra_probs()[..., 0]

    # -- groups ----------------------------------------------------------------------------------------------------

    def group_index(self, anchor_class: Tensor) -> Tensor:
        """(B,) label values at the patch centres -> (B,) int64 group indices."""
        lut = self.label_lut.to(anchor_class.device)
        anchor = anchor_class.to(torch.int64)
        index = lut[anchor.clamp(0, lut.numel() - 1)]
        bad = (anchor < 0) | (anchor >= lut.numel()) | (index < 0)
        if bool(bad.any()):
            raise PolicyError(
                f"anchor classes {sorted(set(anchor[bad].tolist()))} are not labels of this policy "
                f"(labels: {self.label_names}); bind the policy to the dataset's labels with with_labels()."
            )
        return index

    # -- TRA sampling ------------------------------------------------------------------------------------------------

    def sample_tra(self, group_idx: Tensor, generator: torch.Generator | None) -> Tensor:
        """Bins (B, n_ops) int64, one per op per sample, for samples of the given groups (B,).

        "independent" draws every op's bin from its group's categorical; "randaugment", "trivialaugment" and "none"
        are the baseline samplers (see `baseline_marginals`) and ignore the logits.
        """
        with torch.no_grad():
            logits = self.masked_tra_logits()
            group_idx = group_idx.to(logits.device)
            batch = group_idx.shape[0]
            n_ops = len(self.op_names)
            if self.sampling == "none":
                return torch.zeros(batch, n_ops, dtype=torch.int64, device=logits.device)
            if self.sampling == "independent":
                return gumbel_max(logits[group_idx], generator)
            available = self.available.to(logits.device)
            if self.sampling == "randaugment":
                bin_mask = self._level_mask(self.randaugment_m).to(logits.device)
                n_pick = self.randaugment_n
            else:
                bin_mask = available.clone()
                bin_mask[:, 0] = False
                n_pick = 1
            eligible = bin_mask.any(-1)
            n_pick = min(n_pick, int(eligible.sum()))
            if n_pick == 0:
                return torch.zeros(batch, n_ops, dtype=torch.int64, device=logits.device)
            # n_pick distinct ops uniformly: the top n_pick of iid uniform keys among eligible ops.
            keys = torch.rand(batch, n_ops, generator=generator, device=logits.device).masked_fill(~eligible, -1.0)
            chosen = torch.zeros(batch, n_ops, dtype=torch.bool, device=logits.device)
            chosen.scatter_(1, keys.topk(n_pick, dim=1).indices, True)
            bins = gumbel_max(log_mask(bin_mask, logits).expand(batch, n_ops, -1), generator)
            return torch.where(chosen, bins, torch.zeros_like(bins))

    def _level_mask(self, m: int) -> Tensor:
        """(n_ops, max_bins) bool: the bins of magnitude level m of each op (its strongest level if it has fewer)."""
        mask = torch.zeros_like(self.available, device="cpu")
        for op, bins in enumerate(self.op_bins):
            levels = magnitude_levels(bins, self.available[op].tolist())
            if levels:
                mask[op, levels[min(m, len(levels)) - 1]] = True
        return mask

    def baseline_marginals(self) -> Tensor:
        """(n_ops, max_bins): per-op bin probabilities of this policy's baseline sampler (exact, float64).

        randaugment: n distinct ops uniformly among those with an available non-off bin, each at a uniformly chosen
        bin of magnitude level m (`magnitude_levels`); trivialaugment: one such op, one of its available non-off bins
        uniformly; none: bin 0 always. For "independent", the group-averaged policy probabilities.
        """
        n_ops, max_bins = self.available.shape
        if self.sampling == "independent":
            return self.tra_probs().detach().double().mean(0).cpu()
        out = torch.zeros(n_ops, max_bins, dtype=torch.float64)
        out[:, 0] = 1.0
        if self.sampling == "none":
            return out
        if self.sampling == "randaugment":
            bin_mask, n_pick = self._level_mask(self.randaugment_m), self.randaugment_n
        else:
            bin_mask, n_pick = self.available.clone().cpu(), 1
            bin_mask[:, 0] = False
        eligible = bin_mask.any(-1)
        n_eligible = int(eligible.sum())
        if n_eligible == 0:
            return out
        p_op = min(n_pick, n_eligible) / n_eligible
        spread = bin_mask.double() / bin_mask.double().sum(-1, keepdim=True).clamp_min(1)
        out = torch.where(eligible.unsqueeze(-1), p_op * spread, out)
        out[eligible, 0] = 1.0 - p_op
        return out

    def tra_weights(self, group_idx: Tensor, bins: Tensor, generator: torch.Generator | None,
                    estimator: str = "straight_through") -> Tensor:
        """(B, n_ops) weights of drawn bins (B, n_ops) under the groups' categoricals, value exactly 1.0, with their
        gradient into tra_logits[group, op, :] only.

        estimator "straight_through": gradient d softmax((phi + G) / tau)_a / d phi, with G an exact conditional
        Gumbel draw given argmax(phi + G) = a (a = the drawn bin); "reinforce": the score d log p_a / d phi (no draw).
        """
        if estimator not in ESTIMATORS:
            raise PolicyError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        logits = self.masked_tra_logits()
        group_idx = group_idx.to(logits.device)
        bins = bins.to(device=logits.device, dtype=torch.int64)
        phi = logits[group_idx]
        self._check_index(bins, self.available.to(logits.device).unsqueeze(0).expand(bins.shape[0], -1, -1), "bins")
        if estimator == "reinforce":
            return score_function(phi, bins)
        perturbed = conditional_gumbel(phi, bins, generator)
        return straight_through(phi, perturbed, bins, self.tau)

    @staticmethod
    def _check_index(index: Tensor, available: Tensor, what: str) -> None:
        size = available.shape[-1]
        in_range = (index >= 0) & (index < size)
        ok = in_range & available.gather(-1, index.clamp(0, size - 1).unsqueeze(-1)).squeeze(-1)
        if not bool(ok.all()):
            raise PolicyError(
                f"{what} must index available categories; got unavailable or out-of-range values "
                f"{sorted(set(index[~ok].tolist()))}. Draw them with this policy's sample method."
            )

    # -- TEA ---------------------------------------------------------------------------------------------------------

    def sample_tea(self, n: int, generator: torch.Generator | None) -> Tensor:
        """(n,) int64 TEA pool ids drawn from the TEA categorical."""
        with torch.no_grad():
            logits = self.masked_tea_logits()
            return gumbel_max(logits.expand(n, -1), generator)

    def tea_weights(self, ids: Tensor, generator: torch.Generator | None) -> Tensor:
        """(n,) straight-through weights of drawn ids (n,): value exactly 1, gradient into tea_logits."""
        logits = self.masked_tea_logits()
        ids = ids.to(device=logits.device, dtype=torch.int64)
        phi = logits.expand(ids.shape[0], -1)
        self._check_index(ids, self.tea_available.to(logits.device).expand(ids.shape[0], -1), "TEA ids")
        perturbed = conditional_gumbel(phi, ids, generator)
        return straight_through(phi, perturbed, ids, self.tau)

    def tea_selected(self, top_k: int | None = None) -> list[tuple[int, float]]:
        """The top-K TEA entries, best first, as (pool id, weight) with the weights renormalised to sum to 1.

        Ties are broken towards the lower id, so the identity (id 0) wins a tie.
        """
        k = self.tea_top_k if top_k is None else int(top_k)
        probs = self.tea_probs().detach().double().cpu().tolist()
        candidates = [i for i in range(len(probs)) if bool(self.tea_available[i])]
        if not 1 <= k <= len(candidates):
            raise PolicyError(f"top_k must be in [1, {len(candidates)}] (available TEA entries), got {k}.")
        best = sorted(candidates, key=lambda i: (-probs[i], i))[:k]
        total = sum(probs[i] for i in best)
        if total <= 0:
            return [(i, 1.0 / k) for i in best]
        return [(i, probs[i] / total) for i in best]

    # -- display -----------------------------------------------------------------------------------------------------

    def summary(self, top: int = 3) -> str:
        """One line for logs: per group the ops most likely applied, with P(on); then the TEA leaders."""
        p_on = self.p_on().detach().cpu()
        parts = []
        for g, group in enumerate(self.group_names):
            order = sorted(range(len(self.op_names)), key=lambda k: (-float(p_on[g, k]), k))
            shown = [f"{self.op_names[k]} {_fmt_prob(float(p_on[g, k]))}" for k in order[:top]]
            more = " ..." if len(order) > top else ""
            parts.append(f"{group}: {', '.join(shown)}{more}")
        # The TEA's own probabilities: weights renormalised over the two shown would read as a two-view TTA.
        tea_probs = self.tea_probs().detach().double().cpu().tolist()
        available = [i for i in range(len(tea_probs)) if bool(self.tea_available[i])]
        leaders = sorted(available, key=lambda i: (-tea_probs[i], i))
        tea = ", ".join(f"{self.tea_entries[i].name} {_fmt_prob(tea_probs[i])}" for i in leaders[:2])
        parts.append(f"tea: {tea}{' ...' if len(leaders) > 2 else ''}")
        return f"Policy({' | '.join(parts)})"

    def __repr__(self) -> str:
        return self.summary()

    # -- derived policies --------------------------------------------------------------------------------------------

    def replace(self, **changes) -> Policy:
        """A new policy with the same spec and (cloned) logits, except for `changes` (constructor arguments)."""
        kwargs = dict(
            dims=self.dims,
            op_specs=self.op_specs,
            group_labels=self.group_labels,
            label_names=self.label_names,
            tea_entries=self.tea_entries,
            tra_logits=self.tra_logits.detach().cpu().clone(),
            tea_logits=self.tea_logits.detach().cpu().clone(),
            available=self.available.cpu().clone(),
            tea_available=self.tea_available.cpu().clone(),
            sampling=self.sampling,
            randaugment_n=self.randaugment_n,
            randaugment_m=self.randaugment_m,
            tea_top_k=self.tea_top_k,
            tau=self.tau,
        )
        kwargs.update(changes)
        return Policy(**kwargs)

    def group_label_names(self) -> dict[str, tuple[str, ...]]:
        """Group -> the names of its labels, in label-value order."""
        names_of = {value: name for name, value in self.label_names.items()}
        return {group: tuple(names_of[v] for v in self.group_labels[group]) for group in self.group_names}

    def with_labels(self, label_names: Mapping[str, int] | Sequence[str]) -> Policy:
        """This policy bound to a dataset's labels (name -> value); logits unchanged.

        Binding rules: a single group `all` takes every label; groups exactly `background`/`foreground` whose
        background holds only label value 0 bind to any dataset (label 0 -> background, every other label ->
        foreground); any other grouping binds by label name, and the dataset must have exactly those names.
        """
        labels = normalise_labels(label_names)
        if labels == self.label_names:
            return self
        if self.group_names == (AGNOSTIC_GROUP,):
            groups = {AGNOSTIC_GROUP: list(labels)}
        elif self.group_names == DEFAULT_GROUPS and self.group_labels["background"] == (0,):
            groups = None
        else:
            by_name = self.group_label_names()
            wanted = sorted(name for names in by_name.values() for name in names)
            if sorted(labels) != wanted:
                raise PolicyError(
                    f"this policy's groups {dict(by_name)} name labels {wanted}, but the dataset's labels are "
                    f"{sorted(labels)}; use a policy whose groups name the dataset's labels, or the default "
                    "background/foreground groups."
                )
            groups = {group: list(names) for group, names in by_name.items()}
        return self.replace(label_names=labels, group_labels=resolve_groups(labels, groups, class_specific=True))

    def with_patch_size(self, patch_size: Sequence[int] | None, spacing: Sequence[float] | None = None) -> Policy:
        """This policy with the rotations a patch of `patch_size` on a grid of `spacing` mm cannot take made
        unavailable (ops/geometry.py: quarter turns in non-square planes or planes of unequal spacing, large tilts of
        a coarse axis on strongly anisotropic grids), for TRA and TEA alike."""
        blocked = rot90_unavailable(self.op_specs, patch_size, spacing)
        turns = tea_turns_unavailable(self.tea_entries, patch_size, spacing)
        if not blocked and not turns:
            return self
        available = self.available.cpu().clone()
        for op, index in blocked:
            available[self.op_names.index(op), index] = False
        tea_available = self.tea_available.cpu().clone()
        tea_available[turns] = False
        return self.replace(available=available, tea_available=tea_available)
