"""One iteration of the joint search (METHOD 4.2): TRA meta-step (A), TEA step (B), segmenter step (C).

The three steps share one forward/backward of the segmenter on the TRA-augmented batch: its gradient is both the
segmenter's update direction and the inner gradient of the meta-step, so it is computed once.
Policy gradients never flow through the augmentation itself: they reach the logits through straight-through
per-sample weights (value 1), scaled by detached coefficients (METHOD 3.1, 4.2 step 9).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from augsearch.augment import augment_batch
from augsearch.data.sampler import Batch
from augsearch.learn.guard import NonFiniteGuard, guarded_step
from augsearch.learn.meta import (
    centre_and_normalise,
    group_means,
    tea_coefficients,
    tra_meta_coefficients,
)
from augsearch.learn.tea_update import tea_apply_mask, tea_view_losses
from augsearch.ops.spatial import centre_crop
from augsearch.ops.tea import tea_apply
from augsearch.policy.core import Policy
from augsearch.regularizers import asymmetric_augment_mask

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Counters and last values of one epoch, for logs and TensorBoard."""

    meta_steps: int = 0
    empty_group_updates: int = 0  # (meta-step, class group) pairs whose policy update was exactly zero
    tea_steps: int = 0
    last_val_loss: float = float("nan")
    last_tea_loss: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class JointStep:
    """Holds the policy, its optimisers and the loss functions; `run` performs one iteration."""

    model: torch.nn.Module
    policy: Policy | None
    optimizer: torch.optim.Optimizer | None
    tra_optimizer: torch.optim.Optimizer | None
    tea_optimizer: torch.optim.Optimizer | None
    per_sample_loss: Callable[[Tensor | list[Tensor], Tensor], Tensor]
    outer_loss: Callable[[Tensor, Tensor], Tensor]
    patch_size: list[int]
    num_classes: int
    fg_classes: list[int]
    tea_fg_classes: list[int]
    meta_backend: str = "jvp"
    baseline: bool = True
    count_normalization: bool = True
    grad_clip: float | None = 12.0
    reference_signs: bool = False
    bg_augment_prob: float = 1.0
    tea_views: int = 8
    couple_tea_to_outer: bool = True
    regularizers: Callable[[Tensor, Tensor, Tensor], dict[str, float]] | None = None
    baseline_decay: float = 0.9
    warn_every: int = 50
    stats: StepStats = field(default_factory=StepStats)
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    iteration: int = 0  # counts `run` calls, for messages
    # Per-group exponential running mean of the meta-gradients (G,), the baseline of a group with one sample in a
    # batch; `baseline_seen` (G,) bool marks groups that have had samples (before that, the baseline is 0).
    running_baseline: Tensor | None = None
    baseline_seen: Tensor | None = None

    # --- sampling and augmentation -------------------------------------------------------------------------

    def augment(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """TRA-augment a training batch. Returns image (B,C,*P), mask (B,*P), group (B,), bins (B,n_ops),
        and `learnable` (B,) bool: samples whose bins were drawn from the policy (asymmetric augmentation may
        leave background patches unaugmented; those carry no policy gradient)."""
        if self.policy is None:
            bsz, device = batch.image.shape[0], batch.image.device
            no_ops = torch.zeros(bsz, 0, dtype=torch.long, device=device)
            crop = centre_crop(batch.image, self.patch_size), centre_crop(batch.mask, self.patch_size)
            group = torch.zeros(bsz, dtype=torch.long, device=device)
            return *crop, group, no_ops, torch.zeros(bsz, dtype=torch.bool, device=device)
        group = self.policy.group_index(batch.anchor_class)
        bins = self.policy.sample_tra(group, generator)
        learnable = torch.ones_like(group, dtype=torch.bool)
        if self.bg_augment_prob < 1.0:

            learnable = asymmetric_augment_mask(batch.anchor_class, self.bg_augment_prob, generator)
            bins = bins * learnable.unsqueeze(1)
        image, mask = augment_batch(
            batch.image, batch.mask, bins, self.policy.op_names, self.patch_size,
            generator=generator, reference_signs=self.reference_signs,
        )
        return image, mask, group, bins, learnable

    def tea_outer_batch(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The validation batch of the TRA outer loss, seen through views drawn from the current TEA policy."""
        if self.policy is None or not self.couple_tea_to_outer:
            return centre_crop(batch.image, self.patch_size), centre_crop(batch.mask, self.patch_size)
        ids = self.policy.sample_tea(batch.image.shape[0], generator)
        image = tea_apply(batch.image, ids, len(self.patch_size))
        spatial = torch.tensor([entry.spatial for entry in self.policy.tea_entries], device=ids.device)
        mask = tea_apply_mask(batch.mask, ids, self.num_classes, spatial)
        return centre_crop(image, self.patch_size), centre_crop(mask, self.patch_size)

    def state_dict(self) -> dict[str, Tensor | None]:
        """The step's own state beyond the model, policy and optimisers: the running baselines."""
        return {"running_baseline": self.running_baseline, "baseline_seen": self.baseline_seen}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        device = self.policy.tra_logits.device if self.policy is not None else None
        self.running_baseline, self.baseline_seen = (
            None if state[key] is None else state[key].to(device) for key in ("running_baseline", "baseline_seen")
        )

    # --- the three steps ----------------------------------------------------------------------------------

    def run(
        self,
        batch: Batch,
        val_batch: Batch | None,
        tea_batch: Batch | None,
        *,
        inner_lr: float,
        generator: torch.Generator,
    ) -> float:
        """One iteration; `val_batch` triggers step A, `tea_batch` step B. Returns the training loss."""
        image, mask, group, bins, learnable = self.augment(batch, generator)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        self.iteration += 1
        losses = self.per_sample_loss(self.model(image), mask)
        loss = losses.mean()
        loss.backward()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):  # a diverged segmenter: no step of any kind can use this iteration
            self.guard.record("segmenter", False, self.iteration)
            return loss_value
        if val_batch is not None:
            self._tra_meta_step(image, mask, group, bins, learnable, val_batch, inner_lr, generator)
        if tea_batch is not None:
            self._tea_step(tea_batch, generator)
        updated = self.optimizer is not None and self.segmenter_update(loss_value, params)
        if updated and self.regularizers is not None:
            self.stats.extra.update(self.regularizers(image, mask, batch.anchor_class))
        return loss_value

    def segmenter_update(self, loss_value: float, params: list[Tensor]) -> bool:
        """Clip and apply the segmenter's gradient, or skip it (counted) when the loss or gradient is not finite."""
        assert self.optimizer is not None
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        ok = math.isfinite(loss_value) and math.isfinite(float(norm))
        if ok:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return self.guard.record("segmenter", ok, self.iteration)

    def _tra_meta_step(self, image, mask, group, bins, learnable, val_batch, inner_lr, generator) -> None:
        assert self.policy is not None and self.tra_optimizer is not None
        inner_grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        val_image, val_mask = self.tea_outer_batch(val_batch, generator)
        result = tra_meta_coefficients(
            self.model, image, mask, val_image, val_mask,
            inner_lr=inner_lr, per_sample_loss_fn=self.per_sample_loss, val_loss_fn=self.outer_loss,
            backend=self.meta_backend, inner_grads=inner_grads,
        )
        self.stats.last_val_loss = result.val_loss
        if not result.finite:
            self.guard.record("tra", False, self.iteration)
            return
        coefficients = result.coefficients * learnable
        grad_weights = centre_and_normalise(
            coefficients, group, bins, baseline=self.baseline, count_normalization=self.count_normalization,
            running_baseline=self._update_running_baseline(coefficients, group) if self.baseline else None,
        ) * learnable.unsqueeze(1)
        self._count_empty_groups(grad_weights, group)
        weights = self.policy.tra_weights(group, bins, generator)
        self.tra_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(weights, grad_tensors=grad_weights.to(weights.dtype))
        if self.guard.record("tra", guarded_step(self.tra_optimizer, [self.policy.tra_logits]), self.iteration):
            self.stats.meta_steps += 1

    def _update_running_baseline(self, coefficients: Tensor, group: Tensor) -> Tensor:
        """The running baseline before this step (G,), then this step's group means folded into it."""
        n_groups = len(self.policy.group_names)
        if self.running_baseline is None:
            self.running_baseline = torch.zeros(n_groups, dtype=coefficients.dtype, device=coefficients.device)
            self.baseline_seen = torch.zeros(n_groups, dtype=torch.bool, device=coefficients.device)
        before = self.running_baseline.clone()
        means, counts = group_means(coefficients, group, n_groups)
        present = counts > 0
        blended = self.baseline_decay * self.running_baseline + (1 - self.baseline_decay) * means
        self.running_baseline = torch.where(present, torch.where(self.baseline_seen, blended, means), before)
        self.baseline_seen = self.baseline_seen | present
        return before

    def _count_empty_groups(self, grad_weights: Tensor, group: Tensor) -> None:
        """Count the class groups whose policy update is exactly zero this step, and warn every `warn_every`."""
        names = self.policy.group_names
        moved = torch.zeros(len(names), device=group.device)
        moved.index_add_(0, group, (grad_weights != 0).any(1).to(moved.dtype))
        empty = [name for name, count in zip(names, moved.tolist(), strict=True) if count == 0]
        if not empty:
            return
        before = self.stats.empty_group_updates
        self.stats.empty_group_updates += len(empty)
        # The first time, then once per `warn_every` empty updates: loud, but not one line per step.
        if before == 0 or before // self.warn_every != self.stats.empty_group_updates // self.warn_every:
            logger.warning(
                "TRA meta-step %d: no policy update for class group(s) %s (%d empty group updates in %d "
                "meta-steps so far): the batch held no augmented sample of the group, or its gradients cancelled. "
                "A larger train.batch_size or a train.fg_fraction nearer 0.5 gives every group samples more often.",
                self.stats.meta_steps + 1, ", ".join(empty), self.stats.empty_group_updates, self.stats.meta_steps + 1,
            )

    def _tea_step(self, tea_batch: Batch, generator: torch.Generator) -> None:
        assert self.policy is not None and self.tea_optimizer is not None
        was_training = self.model.training
        self.model.eval()
        total_loss = 0.0
        self.tea_optimizer.zero_grad(set_to_none=True)
        for index in range(tea_batch.image.shape[0]):
            ids = self.policy.sample_tea(self.tea_views, generator)
            losses = tea_view_losses(
                self.model, tea_batch.image[index : index + 1], tea_batch.mask[index : index + 1], ids,
                self.patch_size, self.tea_fg_classes,
            )
            coefficients = tea_coefficients(
                losses, ids, baseline=self.baseline, count_normalization=self.count_normalization
            )
            weights = self.policy.tea_weights(ids, generator)
            torch.autograd.backward(weights, grad_tensors=coefficients.to(weights.dtype))
            total_loss += float(losses.mean())
        self.model.train(was_training)
        self.stats.last_tea_loss = total_loss / tea_batch.image.shape[0]
        if self.guard.record("tea", guarded_step(self.tea_optimizer, [self.policy.tea_logits]), self.iteration):
            self.stats.tea_steps += 1
