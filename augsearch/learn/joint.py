"""One iteration of the joint search (METHOD 4.2): TRA meta-step (A), TEA step (B), segmenter step (C).

The three steps share one forward/backward of the segmenter on the TRA-augmented batch: its gradient is both the
segmenter's update direction and the inner gradient of the meta-step, so it is computed once.
Policy gradients never flow through the augmentation itself: they reach the logits through straight-through
per-sample weights (value 1), scaled by detached coefficients (METHOD 3.1, 4.2 step 9), or with
augment.tra.estimator = "reinforce" through score-function weights (policy/gumbel.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from augsearch.augment import augment_batch
from augsearch.config import AugmentConfig, LossConfig, TrainConfig
from augsearch.data.sampler import Batch
from augsearch.learn.colab import ColabGenerator
from augsearch.learn.guard import NonFiniteGuard, guarded_step
from augsearch.learn.meta import (
    centre_and_normalise,
    group_means,
    tea_coefficients,
    tra_meta_coefficients,
)
from augsearch.learn.server import PolicySync
from augsearch.learn.tea_update import tea_apply_mask, tea_view_losses
from augsearch.ops.spatial import centre_crop
from augsearch.ops.tea import tea_apply
from augsearch.policy.core import Policy
from augsearch.regularizers import asymmetric_augment_mask

logger = logging.getLogger(__name__)
WARN_EVERY = 50  # empty group updates between two warnings


@dataclass
class StepStats:
    """Counters over the whole run (kept in the checkpoint, so a resumed run counts on) and last values, for logs
    and TensorBoard."""

    meta_steps: int = 0
    empty_group_updates: int = 0  # (meta-step, class group) pairs whose policy update was exactly zero
    tea_steps: int = 0
    last_val_loss: float = float("nan")
    last_tea_loss: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class JointRuntime:
    """The objects a joint step works on, built once by `fit` (or a benchmark) from the config.

    optimizer: the segmenter's (None freezes it); tra_optimizer / tea_optimizer: Adam on the policy's logits (None
    skips that step). per_sample_loss(model output, target) -> (B,); outer_loss(model output, target) -> scalar.
    fg_classes: the foreground label values. regularizers: extra segmenter steps after the main one (METHOD 7).
    Context labels (augsearch/context_labels.py): context_target(image, labels) -> the training loss's target over
    the model's K + t outputs (None: the labels themselves); colab: the generator that makes those targets and
    steps with every TRA meta-step's validation batch; task_model: the model seen with K merged outputs, for the
    TEA step (None: the model itself). outer_loss then merges the outputs itself.
    """

    model: torch.nn.Module
    policy: Policy | None
    optimizer: torch.optim.Optimizer | None
    tra_optimizer: torch.optim.Optimizer | None
    tea_optimizer: torch.optim.Optimizer | None
    per_sample_loss: Callable[[Tensor | list[Tensor], Tensor], Tensor]
    outer_loss: Callable[[Tensor, Tensor], Tensor]
    num_classes: int
    fg_classes: list[int]
    regularizers: Callable[[Tensor, Tensor, Tensor], dict[str, float]] | None = None
    spacing: tuple[float, ...] | None = None  # mm per axis of the patches' grid; None: rotations of the voxel grid
    context_target: Callable[[Tensor, Tensor], Tensor] | None = None
    colab: ColabGenerator | None = None
    task_model: torch.nn.Module | None = None


class JointStep:
    """One iteration of the joint search over a `JointRuntime`, configured by the config's sections.

    `policy_sync` (a `PolicySync` of augsearch.learn.server) sends the policy gradients to a policy server that
    steps one shared policy; without it the runtime's own optimisers step the logits.
    """

    def __init__(self, runtime: JointRuntime, augment: AugmentConfig, train: TrainConfig, loss: LossConfig,
                 policy_sync: PolicySync | None = None):
        self.runtime = runtime
        self.augment_cfg = augment
        self.train_cfg = train
        self.loss_cfg = loss
        self.policy_sync = policy_sync
        self.stats = StepStats()
        self.model = runtime.model
        self.task_model = runtime.task_model if runtime.task_model is not None else runtime.model
        self.policy = runtime.policy
        self.patch_size = list(train.patch_size)
        self.tea_fg_classes = [1] if augment.tea.class1_only else list(runtime.fg_classes)
        self.couple_tea_to_outer = augment.tea.learn and augment.tea.augment_outer_batch
        self._pending_tra: list[Tensor] = []
        self._pending_tea: list[Tensor] = []
        self._pending_iterations = 0
        self.guard = NonFiniteGuard(train.max_nonfinite_in_a_row)
        self.iteration = 0  # counts `run` calls, for messages
        # Per-group exponential running mean of the meta-gradients (G,): the baseline of a group with one sample in a
        # batch; `_baseline_seen` (G,) marks groups that have had samples (before that, the baseline is 0).
        self._running_baseline: Tensor | None = None
        self._baseline_seen: Tensor | None = None

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
        if self.loss_cfg.bg_augment_prob < 1.0:
            learnable = asymmetric_augment_mask(batch.anchor_class, self.loss_cfg.bg_augment_prob, generator)
            bins = bins * learnable.unsqueeze(1)
        image, mask = augment_batch(
            batch.image, batch.mask, bins, self.policy.op_names, self.patch_size,
            generator=generator, reference_signs=self.augment_cfg.reference_signs, spacing=self.runtime.spacing,
        )
        return image, mask, group, bins, learnable

    def tea_outer_batch(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The validation batch of the TRA outer loss, seen through views drawn from the current TEA policy."""
        if self.policy is None or not self.couple_tea_to_outer:
            return centre_crop(batch.image, self.patch_size), centre_crop(batch.mask, self.patch_size)
        ids = self.policy.sample_tea(batch.image.shape[0], generator)
        image = tea_apply(batch.image, ids, len(self.patch_size), spacing=self.runtime.spacing)
        spatial = torch.tensor([entry.spatial for entry in self.policy.tea_entries], device=ids.device)
        mask = tea_apply_mask(batch.mask, ids, self.runtime.num_classes, spatial, self.runtime.spacing)
        return centre_crop(image, self.patch_size), centre_crop(mask, self.patch_size)

    def state_dict(self) -> dict[str, Any]:
        """The step's own state beyond the model, policy and optimisers: the running baselines, the run's counters
        (and the CoLab generator with its optimiser)."""
        state = {"running_baseline": self._running_baseline, "baseline_seen": self._baseline_seen,
                 "counters": {"meta_steps": self.stats.meta_steps, "tea_steps": self.stats.tea_steps,
                              "empty_group_updates": self.stats.empty_group_updates,
                              "skipped": dict(self.guard.skipped)}}
        if self.runtime.colab is not None:
            state["colab"] = self.runtime.colab.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.policy.tra_logits.device if self.policy is not None else None
        self._running_baseline, self._baseline_seen = (
            None if state[key] is None else state[key].to(device) for key in ("running_baseline", "baseline_seen")
        )
        counters = state.get("counters")  # absent from checkpoints written before the counters were kept
        if counters is not None:
            self.stats.meta_steps, self.stats.tea_steps = counters["meta_steps"], counters["tea_steps"]
            self.stats.empty_group_updates = counters["empty_group_updates"]
            self.guard.skipped.update(counters["skipped"])
        if self.runtime.colab is not None and state.get("colab") is not None:
            self.runtime.colab.load_state_dict(state["colab"])

    # --- the three steps ----------------------------------------------------------------------------------

    def run(
        self,
        batch: Batch,
        val_batch: Batch | None,
        tea_batch: Batch | None,
        *,
        inner_lr: float,
        generator: torch.Generator,
    ) -> float | None:
        """One iteration; `val_batch` triggers step A (and the CoLab generator's step), `tea_batch` step B. Returns
        the training loss, or None when the segmenter is frozen (then only step B runs: no training patch is
        augmented, nothing is back-propagated).

        The policy gradients of A and B are applied together after B (B reads only the TEA logits, so the order
        does not matter); with `augment.accumulate` = k they are averaged over k such iterations first.
        """
        self.iteration += 1
        if self.runtime.optimizer is None:  # a TEA-only search on a trained model (config forbids TRA there)
            if tea_batch is not None:
                self._policy_update(None, self.tea_gradient(tea_batch, generator))
            return None
        image, mask, group, bins, learnable = self.augment(batch, generator)
        target = self.train_target(image, mask)
        params, loss = self._train_backward(image, target)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):  # a diverged segmenter: no step of any kind can use this iteration
            self.guard.record("segmenter", False, self.iteration)
            return loss_value
        tra_grad = tea_grad = None
        learn_tra = val_batch is not None and (self.runtime.tra_optimizer is not None or self.runtime.colab is None)
        if learn_tra:
            tra_grad = self.tra_gradient(image, target, group, bins, learnable, val_batch, inner_lr, generator)
        if tea_batch is not None:
            tea_grad = self.tea_gradient(tea_batch, generator)
        if learn_tra or tea_batch is not None:
            self._policy_update(tra_grad, tea_grad)
        if val_batch is not None and self.runtime.colab is not None:
            self.colab_update(image, mask, val_batch, inner_lr, generator)
        if self.segmenter_update(params) and self.runtime.regularizers is not None:
            self.stats.extra.update(self.runtime.regularizers(image, mask, batch.anchor_class))
        return loss_value

    def segmenter_update(self, params: list[Tensor]) -> bool:
        """Clip and apply the segmenter's gradient, or skip it (counted) when the gradient is not finite."""
        optimizer = self.runtime.optimizer
        assert optimizer is not None
        if self.train_cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.train_cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        ok = math.isfinite(float(norm))
        if ok:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
        return self.guard.record("segmenter", ok, self.iteration)

    def train_target(self, image: Tensor, mask: Tensor) -> Tensor:
        """The training loss's target for the augmented batch: the labels, or context-extended targets."""
        return mask if self.runtime.context_target is None else self.runtime.context_target(image, mask)

    def colab_update(self, image: Tensor, mask: Tensor, val_batch: Batch, inner_lr: float,
                     generator: torch.Generator) -> None:
        """One CoLab generator step at the current segmenter, on the TRA outer batch (learn/colab.py)."""
        colab = self.runtime.colab
        val_image, val_mask = self.tea_outer_batch(val_batch, generator)
        # `.grad` still holds this iteration's training gradient on the generator's targets (the segmenter has not
        # stepped yet): the generator's inner step reuses it, as the TRA meta-step does
        inner_grads = {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}
        ok = colab.meta_update(
            self.model, image, mask, val_image, val_mask, inner_lr=inner_lr,
            train_loss_fn=lambda output, target: self.runtime.per_sample_loss(output, target).mean(),
            val_loss_fn=self.runtime.outer_loss, inner_grads=inner_grads,
        )
        self.guard.record("colab", ok, self.iteration)
        self.stats.extra["colab/val_loss"] = colab.last_val_loss

    def _train_backward(self, image: Tensor, mask: Tensor) -> tuple[list[Tensor], Tensor]:
        """Forward and backward of the training loss in train mode: `.grad` holds the inner gradient."""
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        loss = self.runtime.per_sample_loss(self.model(image), mask).mean()
        loss.backward()
        return params, loss

    def meta_gradient_draw(self, batch: Batch, val_batch: Batch, *, inner_lr: float,
                           generator: torch.Generator) -> Tensor | None:
        """One TRA meta-gradient (G, n_ops, max_bins) at the current segmenter and policy; nothing is stepped.

        For measurements of the signal (augsearch bench signal): the same draw as step A of `run`.
        """
        image, mask, group, bins, learnable = self.augment(batch, generator)
        target = self.train_target(image, mask)
        self._train_backward(image, target)
        return self.tra_gradient(image, target, group, bins, learnable, val_batch, inner_lr, generator)

    def tra_gradient(self, image, mask, group, bins, learnable, val_batch, inner_lr, generator) -> Tensor | None:
        """d L_val / d tra_logits (G, n_ops, max_bins) of one meta-step on the augmented batch (image, mask, group,
        bins, learnable from `augment`); None when the meta-gradient is not finite (counted, no update).

        Reads the segmenter's inner gradient from `.grad` (the caller's backward of the training loss).
        """
        assert self.policy is not None
        tra = self.augment_cfg.tra
        inner_grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        val_image, val_mask = self.tea_outer_batch(val_batch, generator)
        result = tra_meta_coefficients(
            self.model, image, mask, val_image, val_mask,
            inner_lr=inner_lr, per_sample_loss_fn=self.runtime.per_sample_loss, val_loss_fn=self.runtime.outer_loss,
            backend=tra.backend, inner_grads=inner_grads,
            preconditioner=adam_preconditioner(self.runtime.optimizer, self.model) if tra.precondition else None,
        )
        self.stats.last_val_loss = result.val_loss
        if not result.finite:
            self.guard.record("tra", False, self.iteration)
            return None
        coefficients = result.coefficients * learnable
        reinforce = tra.estimator == "reinforce"
        grad_weights = centre_and_normalise(
            coefficients, group, bins, baseline=tra.baseline,
            count_normalization=tra.count_normalization and not reinforce,  # the score function stays unbiased
            running_baseline=self._update_running_baseline(coefficients, group) if tra.baseline else None,
        ) * learnable.unsqueeze(1)
        self._count_empty_groups(grad_weights, group)
        weights = self.policy.tra_weights(group, bins, generator, estimator=tra.estimator)
        (grad,) = torch.autograd.grad(weights, self.policy.tra_logits, grad_outputs=grad_weights.to(weights.dtype))
        self.stats.meta_steps += 1
        return grad

    def _update_running_baseline(self, coefficients: Tensor, group: Tensor) -> Tensor:
        """The running baseline before this step (G,), then this step's group means folded into it."""
        n_groups = len(self.policy.group_names)
        if self._running_baseline is None:
            self._running_baseline = torch.zeros(n_groups, dtype=coefficients.dtype, device=coefficients.device)
            self._baseline_seen = torch.zeros(n_groups, dtype=torch.bool, device=coefficients.device)
        before = self._running_baseline.clone()
        means, counts = group_means(coefficients, group, n_groups)
        present = counts > 0
        blended = (self.augment_cfg.tra.baseline_decay * self._running_baseline
                   + (1 - self.augment_cfg.tra.baseline_decay) * means)
        self._running_baseline = torch.where(present, torch.where(self._baseline_seen, blended, means), before)
        self._baseline_seen = self._baseline_seen | present
        return before

    def _count_empty_groups(self, grad_weights: Tensor, group: Tensor) -> None:
        """Count the class groups whose policy update is exactly zero this step, and warn every WARN_EVERY."""
        names = self.policy.group_names
        moved = torch.zeros(len(names), device=group.device)
        moved.index_add_(0, group, (grad_weights != 0).any(1).to(moved.dtype))
        empty = [name for name, count in zip(names, moved.tolist(), strict=True) if count == 0]
        if not empty:
            return
        before = self.stats.empty_group_updates
        self.stats.empty_group_updates += len(empty)
        # The first time, then once per WARN_EVERY empty updates: loud, but not one line per step.
        if before == 0 or before // WARN_EVERY != self.stats.empty_group_updates // WARN_EVERY:
            logger.warning(
                "TRA meta-step %d: no policy update for class group(s) %s (%d empty group updates in %d "
                "meta-steps so far): the batch held no augmented sample of the group, or its gradients cancelled. "
                "A larger train.batch_size or a train.fg_fraction nearer 0.5 gives every group samples more often.",
                self.stats.meta_steps + 1, ", ".join(empty), self.stats.empty_group_updates, self.stats.meta_steps + 1,
            )

    def tea_gradient(self, tea_batch: Batch, generator: torch.Generator) -> Tensor:
        """d L_tea / d tea_logits (A,) summed over the batch's same-patch groups (METHOD 4.2 B)."""
        assert self.policy is not None
        was_training = self.task_model.training
        self.task_model.eval()
        total_loss = 0.0
        grad = None
        for index in range(tea_batch.image.shape[0]):
            ids = self.policy.sample_tea(self.augment_cfg.tea.views, generator)
            losses = tea_view_losses(
                self.task_model, tea_batch.image[index : index + 1], tea_batch.mask[index : index + 1], ids,
                self.patch_size, self.tea_fg_classes, spacing=self.runtime.spacing,
            )
            coefficients = tea_coefficients(
                losses, ids, baseline=self.augment_cfg.tra.baseline,
                count_normalization=self.augment_cfg.tra.count_normalization,
            )
            weights = self.policy.tea_weights(ids, generator)
            (part,) = torch.autograd.grad(weights, self.policy.tea_logits, grad_outputs=coefficients.to(weights.dtype))
            grad = part if grad is None else grad + part
            total_loss += float(losses.mean())
        self.task_model.train(was_training)
        self.stats.last_tea_loss = total_loss / tea_batch.image.shape[0]
        self.stats.tea_steps += 1
        return grad

    # --- policy update ------------------------------------------------------------------------------------

    def _policy_update(self, tra_grad: Tensor | None, tea_grad: Tensor | None) -> None:
        """Collect this iteration's gradients; every `augment.accumulate`-th meta-iteration, step on their means."""
        if tra_grad is not None:
            self._pending_tra.append(tra_grad)
        if tea_grad is not None:
            self._pending_tea.append(tea_grad)
        self._pending_iterations += 1
        if self._pending_iterations < self.augment_cfg.accumulate:
            return
        tra_mean = _mean(self._pending_tra)
        tea_mean = _mean(self._pending_tea)
        drawn = {"tra": len(self._pending_tra), "tea": len(self._pending_tea)}
        self._pending_tra, self._pending_tea, self._pending_iterations = [], [], 0
        if self.policy_sync is not None:
            self.policy_sync.exchange(self.policy, tra_mean, tea_mean)
            return
        for kind, optimizer, logits, grad in (("tra", self.runtime.tra_optimizer, self.policy.tra_logits, tra_mean),
                                              ("tea", self.runtime.tea_optimizer, self.policy.tea_logits, tea_mean)):
            if optimizer is not None and grad is not None:
                logits.grad = grad
                kept = self.guard.record(kind, guarded_step(optimizer, [logits]), self.iteration)
                if not kept:  # meta/steps and tea/steps count the gradients that reached the policy
                    if kind == "tra":
                        self.stats.meta_steps -= drawn["tra"]
                    else:
                        self.stats.tea_steps -= drawn["tea"]
                logits.grad = None


def _mean(grads: list[Tensor]) -> Tensor | None:
    """Mean of equally shaped gradients; the single one as it is (no rounding), None for none."""
    if not grads:
        return None
    return grads[0] if len(grads) == 1 else torch.stack(grads).mean(0)


def adam_preconditioner(optimizer: torch.optim.Optimizer | None, model: torch.nn.Module) -> dict[str, Tensor] | None:
    """Adam's diagonal preconditioner 1 / (sqrt(v_hat) + eps) of each of `model`'s parameters (by name), rescaled to
    mean 1 over all parameters: the shape of the step Adam takes, at the inner step's own scale (METHOD 13, lever 5).

    None when the optimiser is not Adam or has not stepped yet (the identity: the SGD geometry of METHOD 4.2).
    """
    if not isinstance(optimizer, torch.optim.Adam):
        return None
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        state, group = optimizer.state.get(p), group_of.get(id(p))
        if not p.requires_grad:
            continue
        if not state or "exp_avg_sq" not in state or group is None:
            return None
        beta2, eps = group["betas"][1], group["eps"]
        v_hat = ((state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"])
                 / (1 - beta2 ** float(state["step"])))
        out[name] = 1.0 / (v_hat.sqrt() + eps)
    total = sum(float(t.sum()) for t in out.values())
    count = sum(t.numel() for t in out.values())
    return {k: t * (count / total) for k, t in out.items()}
