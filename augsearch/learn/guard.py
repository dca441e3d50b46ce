"""Non-finite updates: skip them, count them, and stop a run that produces nothing else.

A NaN or infinite loss, gradient or step (an optimiser whose learning rate overflows float32 raises inside its
step) must never reach the segmenter's weights or the policy logits: the update is skipped and counted, and after
`limit` skipped updates in a row of one kind the run stops with `NonFiniteError` naming the setting to lower.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from augsearch.errors import AugsearchError

# What to lower when an update of this kind keeps failing.
HINTS = {"segmenter": "train.lr", "tra": "augment.tra.lr", "tea": "augment.tea.lr", "colab": "loss.colab_lr"}


class NonFiniteError(AugsearchError):
    """Too many non-finite updates in a row: the run diverged."""


def all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class NonFiniteGuard:
    """Counts skipped updates per kind ('segmenter', 'tra', 'tea', 'colab'): in total and in a row."""

    limit: int = 20
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HINTS, 0))
    in_a_row: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HINTS, 0))

    def record(self, kind: str, ok: bool, step: int) -> bool:
        """Count one update of KIND; raises NonFiniteError at `limit` skipped in a row. Returns ok."""
        if ok:
            self.in_a_row[kind] = 0
            return True
        self.skipped[kind] += 1
        self.in_a_row[kind] += 1
        if self.in_a_row[kind] >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row[kind]} {kind} updates in a row had a non-finite loss, gradient or step (last at "
                f"iteration {step}); the run diverged and was stopped, keeping the last finite checkpoint. Lower "
                f"{HINTS[kind]} (or raise train.max_nonfinite_in_a_row to tolerate longer streaks)"
            )
        return False


def guarded_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> bool:
    """optimizer.step() on small tensors (policy logits) that is undone when it is not finite.

    Checks the gradients first; after the step, restores PARAMS and the optimiser state when a value became
    non-finite or the step overflowed. Returns whether the step was kept.
    """
    if not all_finite([p.grad for p in params]):
        return False
    saved = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    try:
        optimizer.step()
        ok = all_finite(params)
    except RuntimeError as err:  # e.g. "value cannot be converted to type float without overflow"
        if "overflow" not in str(err):
            raise
        ok = False
    if not ok:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
        optimizer.load_state_dict(state)
    return ok
