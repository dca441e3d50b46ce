"""`fit`: train a segmenter with no augmentation, a fixed policy, or a learned TRA/TEA policy (the joint search).

No Ray in here: a Ray trial calls `fit` with a callback that reports each validation. A run directory holds
`checkpoint.pt` and `policy.json` side by side, `metrics.jsonl`, `config.json` and `tb/` (TensorBoard scalars).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from augsearch.artifacts.checkpoint import Checkpoint, checkpoint_payload, load_checkpoint, package_versions
from augsearch.artifacts.layout import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, POLICY_NAME, TENSORBOARD_DIR
from augsearch.artifacts.run_folder import check_resumable, commit_step, prepare_run_dir, restore_consistency
from augsearch.atomic import dumps_json, write_json
from augsearch.augment import required_margin
from augsearch.config import ExperimentConfig
from augsearch.context_labels import (
    ContextMerged,
    context_spec,
    hard_target,
    merge_logits,
    task_foreground,
    task_labels,
)
from augsearch.data.cases import load_cases
from augsearch.data.dataset import Case, dataset_fingerprint, read_dataset_info
from augsearch.data.preprocess import complete_preprocess, describe_normalisation
from augsearch.data.sampler import Batch, PatchSampler, concat_batches
from augsearch.data.splits import resolve_splits
from augsearch.data.synthetic import ensure_dataset
from augsearch.devices import resolve_device
from augsearch.errors import AugsearchError, DatasetError
from augsearch.learn.colab import ColabGenerator
from augsearch.learn.guard import NonFiniteError, all_finite
from augsearch.learn.joint import JointRuntime, JointStep
from augsearch.learn.server import PolicyServer, PolicySync, tea_adam, tra_adam, worker_shard
from augsearch.losses import batch_loss, deep_supervision_loss, rare_mask
from augsearch.model import UNet, model_config
from augsearch.ops.tea import tea_margin, tea_pool
from augsearch.policy.core import Policy
from augsearch.policy.io import policy_from_dict, policy_to_dict
from augsearch.policy.presets import policy_from_file_or_preset
from augsearch.predict.validation import validate
from augsearch.regularizers import adversarial_perturbation, mixup, soft_target_loss
from augsearch.schedules import poly_lr, set_lr


@dataclass
class EpochReport:
    epoch: int
    metrics: dict[str, float]
    checkpoint_path: Path | None
    policy_path: Path | None


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, float]
    checkpoint_path: Path
    policy_path: Path | None


@dataclass
class _Data:
    label_names: dict[str, int]
    in_channels: int
    train: list[Case]
    val: list[Case]
    fingerprint: str
    preprocess: dict[str, Any]
    split: str  # where the split came from and its sizes
    normalisation: str  # per channel
    spacing: tuple[float, ...]  # mm per axis of the training grid: rotations turn the patient on it


def _load_data(cfg: ExperimentConfig) -> _Data:
    root = ensure_dataset(cfg.data)
    info = read_dataset_info(root)
    if info.dims != cfg.dims:
        raise AugsearchError(
            f"train.patch_size {cfg.train.patch_size} is {cfg.dims}D but dataset {root} is {info.dims}D; "
            f"give train.patch_size {info.dims} entries"
        )
    splits = resolve_splits(info, cfg.data.split)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else root / ".augsearch_cache"
    preprocess = complete_preprocess(info, cfg.data.preprocess, cache)
    train = load_cases(info, splits.train, preprocess, cache)
    if not any(case.label.any() for case in train):
        raise DatasetError(root / "labelsTr", "foreground voxels in the training labels",
                           f"only background in all {len(train)} training label maps",
                           "check the label files with `augsearch data check`")
    if cfg.search.policy_sharing == "shared" and cfg.search.shard == "disjoint":
        train = worker_shard(train, cfg.search.worker, cfg.search.num_workers)
    val = load_cases(info, splits.val, preprocess, cache)
    if not val:
        raise AugsearchError(f"no validation cases in {root}; name them with data.split.val or raise val_fraction")
    # Saved with the model, so prediction normalises with the numbers measured here.
    # Cases share the target spacing when one is set; otherwise the median grid stands for them all.
    spacing = tuple(float(v) for v in np.median([case.spacing for case in train or val], axis=0))
    return _Data(dict(info.labels), len(info.channel_names), train, val, dataset_fingerprint(info),
                 preprocess.model_dump(mode="json"), splits.describe(),
                 describe_normalisation(preprocess, info.channel_names), spacing)


def _rare_labels(cfg: ExperimentConfig, label_names: dict[str, int]) -> list[str]:
    if cfg.loss.rare_labels is None:
        return [name for name, value in label_names.items() if value != 0]
    return list(cfg.loss.rare_labels)


def _build_policy(cfg: ExperimentConfig, label_names: dict[str, int], spacing: tuple[float, ...],
                  log: Callable[[str], None]) -> Policy | None:
    """The run's policy from `augment.policy` for the training patch on a grid of `spacing` mm;
    `augment.tea.top_k`, when given, replaces the policy's own top-k."""
    if cfg.augment.mode == "none":
        return None
    tra = cfg.augment.tra
    policy = policy_from_file_or_preset(
        cfg.augment.policy,
        dims=cfg.dims,
        label_names=label_names,
        class_specific=tra.class_specific,
        groups=tra.groups,
        patch_size=cfg.train.patch_size,
        spacing=spacing,
        randaugment_n=cfg.augment.randaugment_n,
        randaugment_m=cfg.augment.randaugment_m,
        ops=cfg.augment.ops,
        tea_init=cfg.augment.tea.init,
        tea_exclude=cfg.augment.tea.exclude,
    )
    top_k = cfg.augment.tea.top_k
    if top_k is None and cfg.augment.tea.learn and policy.tea_top_k == 1:
        top_k = 4  # a learned TEA exports its top 4 unless told otherwise (presets select 1 to predict without TTA)
    if top_k is not None and top_k != policy.tea_top_k:
        if cfg.augment.tea.top_k is not None:
            log(f"augment.tea.top_k = {top_k} replaces the policy's own top-k {policy.tea_top_k}")
        policy = policy.replace(tea_top_k=top_k)
    return policy


def _batch_to(batch: Batch, device: torch.device) -> Batch:
    return Batch(**{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)})


def _full_resolution(logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The full-resolution head of a deep-supervised output list (or the tensor itself)."""
    return logits[0] if isinstance(logits, list) else logits


class _Run:
    """Everything `fit` builds once: data, samplers, model, optimisers, policy, the joint step, logs."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, log: Callable[[str], None],
                 policy_server: PolicyServer | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.train.device, option="train.device")
        self.data = _load_data(cfg)
        labels = self.data.label_names
        self.num_classes = max(labels.values()) + 1
        self.rare_labels = _rare_labels(cfg, labels)
        self.rare = rare_mask(labels, cfg.loss.rare_labels, self.num_classes).to(self.device)
        fg = [v for v in sorted(labels.values()) if v != 0]
        # Context labels: the segmenter has K + t outputs; `task_model` shows it with the K labels of the dataset.
        self.context = context_spec(cfg.loss, labels)
        t = self.context.context_classes if self.context is not None else 0
        train_rare = torch.cat([self.rare, torch.zeros(t, dtype=torch.bool, device=self.device)])

        torch.manual_seed(cfg.seed)
        self.model_config = {
            "dims": cfg.dims, "in_channels": self.data.in_channels, "num_classes": self.num_classes + t,
            "base_features": cfg.model.base_features, "max_features": cfg.model.max_features,
            "depth": cfg.model.depth, "deep_supervision": cfg.model.deep_supervision,
            "pool_kernels": cfg.model.pool_kernels,
        }
        self.model = UNet(**self.model_config).to(self.device)
        self.model.check_input(torch.zeros(1, self.data.in_channels, *cfg.train.patch_size))
        if cfg.train.init_checkpoint:
            init = load_checkpoint(cfg.train.init_checkpoint)
            if init.context != (self.context.to_dict() if self.context is not None else None):
                raise AugsearchError(
                    f"train.init_checkpoint {init.path} was trained with context labels {init.context}, this run has "
                    f"{self.context.to_dict() if self.context is not None else None}; set loss.context_labels and "
                    "loss.context_classes as the checkpoint's")
            self.model.load_state_dict(init.model_state)
        self.model_config = model_config(self.model)
        self.task_model = ContextMerged(self.model, self.context) if self.context is not None else self.model
        self.colab = None
        if self.context is not None and self.context.kind == "colab" and cfg.train.update_model:  # frozen: no targets
            self.colab = ColabGenerator(
                self.context, cfg.dims, self.data.in_channels, self.model.pool_kernels[0] if self.model.pool_kernels
                else [1] * cfg.dims, features=cfg.loss.colab_features, lr=cfg.loss.colab_lr,
                backend=cfg.loss.colab_backend, device=self.device,
            )

        self.policy = _build_policy(cfg, labels, self.data.spacing, log)
        if self.policy is not None:
            self.policy.to(self.device)
        aug = cfg.augment
        patch = cfg.train.patch_size
        margin = required_margin(patch, self.policy.op_names, self.data.spacing) if self.policy is not None else 0
        pool_ids = torch.arange(len(tea_pool(cfg.dims)))
        val_margin = tea_margin(cfg.dims, pool_ids, patch, self.data.spacing)
        self.train_sampler = PatchSampler(
            self.data.train, patch, fg_fraction=cfg.train.fg_fraction, margin=margin, seed=cfg.seed
        )
        self.val_sampler = PatchSampler(
            self.data.val, patch, fg_fraction=cfg.train.fg_fraction, margin=val_margin, seed=cfg.seed + 1
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.train_rng = np.random.default_rng([cfg.seed, 0])
        self.val_rng = np.random.default_rng([cfg.seed, 1])

        self.optimizer = self._segmenter_optimizer() if cfg.train.update_model else None
        learn_tra = self.policy is not None and aug.tra.learn
        learn_tea = self.policy is not None and aug.tea.learn
        self.tra_optimizer = tra_adam(self.policy.tra_logits, aug) if learn_tra else None
        self.tea_optimizer = tea_adam(self.policy.tea_logits, aug) if learn_tea else None

        loss_cfg = cfg.loss
        outer_kind = aug.tra.outer_loss
        context = self.context
        task_fg = task_foreground(context, fg)

        def train_loss(logits, target):
            return deep_supervision_loss(logits, target, loss_cfg, train_rare)

        def outer_loss(logits, target):
            # Meta-steps judge the segmenter on the task: merged outputs against the dataset's labels.
            logits = _full_resolution(logits)
            if context is not None:
                logits, target = merge_logits(logits, context), task_labels(context, target)
            return batch_loss(logits, target, outer_kind, task_fg)

        if self.colab is not None:
            context_target = self.colab.target
        elif context is not None:
            def context_target(image, labels):
                return hard_target(context, image, labels)
        else:
            context_target = None

        runtime = JointRuntime(
            model=self.model, policy=self.policy, optimizer=self.optimizer,
            tra_optimizer=self.tra_optimizer, tea_optimizer=self.tea_optimizer,
            per_sample_loss=train_loss, outer_loss=outer_loss, num_classes=self.num_classes, fg_classes=task_fg,
            spacing=self.data.spacing,
            regularizers=self._regularizer_steps() if self.optimizer is not None else None,
            context_target=context_target, colab=self.colab, task_model=self.task_model,
        )
        # A shared policy is stepped by the server; the local TRA/TEA optimisers then only decide which steps run.
        self.policy_sync = (PolicySync(policy_server, cfg.search.worker)
                            if policy_server is not None and (learn_tra or learn_tea) else None)
        self.step = JointStep(runtime, aug, cfg.train, loss_cfg, policy_sync=self.policy_sync)
        self.epoch = 0
        self.global_step = 0

    def outer_batch(self, size: int) -> Batch:
        """Validation patches of a TRA meta-step; augment.tra.outer_rare_fraction of them centred on a rare class."""
        share = self.cfg.augment.tra.outer_rare_fraction
        if share == 0:
            return self.val_sampler.sample(size, generator=self.val_rng)
        rare_values = [v for v in range(self.num_classes) if v != 0 and bool(self.rare[v])]
        n_rare = round(share * size)
        rare = self.val_sampler.sample(n_rare, fg_fraction=1.0, anchor_classes=rare_values, generator=self.val_rng)
        if n_rare == size:
            return rare
        return concat_batches(rare, self.val_sampler.sample(size - n_rare, generator=self.val_rng))

    def _segmenter_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        if t.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay, amsgrad=True)
        return torch.optim.SGD(
            self.model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0,
            weight_decay=t.weight_decay,
        )

    def _regularizer_steps(self) -> Callable | None:
        """Extra optimiser steps of the 2020 paper: adversarial (eps > 0), then mixup (alpha > 0)."""
        loss_cfg = self.cfg.loss
        if loss_cfg.adversarial_eps <= 0 and loss_cfg.mixup_alpha <= 0:
            return None

        def steps(image: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor) -> dict[str, float]:
            out = {}
            if loss_cfg.adversarial_eps > 0:
                r_adv = adversarial_perturbation(
                    self.model, image, mask, xi=loss_cfg.adversarial_xi, eps=loss_cfg.adversarial_eps,
                    rare=self.rare, asymmetric=loss_cfg.asymmetric, generator=self.generator,
                )
                out["train/adversarial_loss"] = self._extra_step(
                    lambda: deep_supervision_loss(self.model(image + r_adv), mask, loss_cfg, self.rare).mean()
                )
            if loss_cfg.mixup_alpha > 0:
                x_mix, soft, valid = mixup(
                    image, mask, self.num_classes, alpha=loss_cfg.mixup_alpha, margin=loss_cfg.mixup_margin,
                    rare=self.rare, asymmetric=loss_cfg.asymmetric, generator=self.generator,
                )
                out["train/mixup_loss"] = self._extra_step(
                    lambda: soft_target_loss(
                        _full_resolution(self.model(x_mix)), soft, valid, loss_cfg, self.rare
                    ).mean()
                )
            return out

        return steps

    def _extra_step(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        value = float(loss.detach())
        if math.isfinite(value):
            self.step.segmenter_update([p for p in self.model.parameters() if p.requires_grad])
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.step.guard.record("segmenter", False, self.step.iteration)
        return value

    # --- state -------------------------------------------------------------------------------------------

    def generator_states(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "train_rng": self.train_rng.bit_generator.state,
            "val_rng": self.val_rng.bit_generator.state,
        }

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.model_state)
        for name, opt in self._optimizers().items():
            if name in ckpt.optimizers:
                opt.load_state_dict(ckpt.optimizers[name])
        if self.policy is not None and ckpt.policy is not None:
            saved = policy_from_dict(ckpt.policy)
            with torch.no_grad():
                self.policy.tra_logits.copy_(saved.tra_logits)
                self.policy.tea_logits.copy_(saved.tea_logits)
        if ckpt.joint_state is not None:
            self.step.load_state_dict(ckpt.joint_state)
        rng = ckpt.rng
        torch.set_rng_state(rng["torch"].cpu())
        self.generator.set_state(rng["generator"].cpu())
        self.train_rng.bit_generator.state = rng["train_rng"]
        self.val_rng.bit_generator.state = rng["val_rng"]
        self.epoch = ckpt.epoch
        self.global_step = ckpt.step

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        named = {"segmenter": self.optimizer, "tra": self.tra_optimizer, "tea": self.tea_optimizer}
        return {k: v for k, v in named.items() if v is not None}


def _provenance(run: _Run, metrics: dict[str, float]) -> dict[str, Any]:

    return {
        "experiment": run.cfg.name,
        "config_sha256": run.cfg.fingerprint(),
        "seed": run.cfg.seed,
        "epoch": run.epoch,
        "step": run.global_step,
        "data_fingerprint": run.data.fingerprint,
        "train_cases": [c.case_id for c in run.data.train],
        "val_cases": [c.case_id for c in run.data.val],
        "validation_metrics": {k: v for k, v in metrics.items() if k.startswith("val/") and math.isfinite(v)},
        "versions": package_versions(),
        "checkpoint": CHECKPOINT_NAME,
        "mode": {
            "augment": run.cfg.augment.mode, "policy": run.cfg.augment.policy,
            "learn_tra": run.cfg.augment.tra.learn, "learn_tea": run.cfg.augment.tea.learn,
            "class_specific": run.cfg.augment.tra.class_specific, "backend": run.cfg.augment.tra.backend,
        },
    }


def _write_step(run: _Run, metrics: dict[str, float]) -> tuple[Path, Path | None]:
    """checkpoint.pt and policy.json of this epoch, committed together; returns their paths."""
    if run.policy is not None and not all_finite([run.policy.tra_logits, run.policy.tea_logits]):
        raise NonFiniteError("the policy logits are not finite; no checkpoint or policy file written. Lower "
                             "augment.tra.lr / augment.tea.lr")
    policy = policy_to_dict(run.policy, _provenance(run, metrics)) if run.policy is not None else None
    payload = checkpoint_payload(
        model=run.model, model_config=run.model_config, config=run.cfg.to_dict(),
        label_names=run.data.label_names, preprocess=run.data.preprocess, patch_size=run.cfg.train.patch_size,
        epoch=run.epoch, step=run.global_step,
        optimizers={name: opt.state_dict() for name, opt in run._optimizers().items()},
        policy=policy, metrics=metrics, generators=run.generator_states(), data_fingerprint=run.data.fingerprint,
        joint_state=run.step.state_dict(), context=run.context.to_dict() if run.context is not None else None,
    )
    commit_step(run.run_dir, payload, policy)
    return run.run_dir / CHECKPOINT_NAME, (run.run_dir / POLICY_NAME if policy is not None else None)


def _progress_numbers(metrics: dict[str, Any], validated: bool) -> str:
    """The losses this epoch measured (a frozen segmenter has no training loss) and, when it validated, the rare
    classes' validation Dice."""
    parts = [f" {name} {metrics[key]:.4f}" for key, name in (("train/loss", "loss"), ("tea/loss", "tea loss"))
             if isinstance(metrics.get(key), float) and math.isfinite(metrics[key])]
    if validated:
        parts.append(f" val dice rare {metrics.get('val/dice_rare', float('nan')):.3f}")
    return "".join(parts)


def _policy_scalars(policy: Policy | None) -> dict[str, float]:
    if policy is None:
        return {}
    out = {}
    probs = policy.tra_probs().detach().cpu()
    for g, group in enumerate(policy.group_names):
        for k, op in enumerate(policy.op_names):
            out[f"policy/{group}/{op}"] = float(1.0 - probs[g, k, 0])
    tea = torch.softmax(policy.tea_logits.detach().cpu(), dim=0)
    for entry_id, weight in policy.tea_selected():
        out[f"tea/{policy.tea_names[entry_id]}"] = float(tea[entry_id])
    return out


def fit(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    callbacks: Sequence[Callable[[EpochReport], None]] = (),
    resume: str | Path | None = None,
    progress: bool = True,
    policy_server: PolicyServer | None = None,
    overwrite: bool = False,
    resume_anyway: bool = False,
    check_config_on_resume: bool = True,
) -> FitResult:
    """Train (and search) as `cfg` says; write checkpoints, policy files and metrics into `run_dir`.

    `progress` prints one line per epoch, and a progress bar when stderr is a terminal. `policy_server` (a shared
    search's worker, augsearch.learn.server) makes the learned policy the server's: the run adopts its logits when it
    starts or resumes, pushes its policy gradients, and has the server checkpoint with every own checkpoint.
    A `run_dir` holding files is refused unless `resume` (continue from that checkpoint) or `overwrite` (remove the
    old run's files). Resuming checks that the checkpoint's config and data match this run's (`resume_anyway` skips
    the check; `check_config_on_resume=False` checks the data only).

    Process state is left as found: the run draws from torch's global RNG inside `torch.random.fork_rng`, seeded
    with `cfg.seed` (model initialisation and anything else that uses it), and `train.num_threads` applies for the
    duration of the call only.
    """
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume=resume is not None, overwrite=overwrite)
    threads = torch.get_num_threads()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        with torch.random.fork_rng(devices=devices):
            return _fit(cfg, run_dir, callbacks=callbacks, resume=resume, progress=progress,
                        policy_server=policy_server, resume_anyway=resume_anyway,
                        check_config_on_resume=check_config_on_resume)
    finally:
        torch.set_num_threads(threads)


def _fit(cfg: ExperimentConfig, run_dir: Path, *, callbacks: Sequence[Callable[[EpochReport], None]],
         resume: str | Path | None, progress: bool, policy_server: PolicyServer | None, resume_anyway: bool,
         check_config_on_resume: bool) -> FitResult:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    run = _Run(cfg, run_dir, log=lambda message: print(f"[{cfg.name}] {message}", flush=True) if progress else None,
               policy_server=policy_server)
    if resume is not None:
        ckpt = load_checkpoint(resume, map_location=run.device)
        check_resumable(ckpt, cfg.to_dict(), cfg.fingerprint(), run.data.fingerprint, anyway=resume_anyway,
                        ignore_config=not check_config_on_resume)
        run.restore(ckpt)
        restore_consistency(run_dir, ckpt)
    run_dir.mkdir(parents=True, exist_ok=True)  # after every check: a refused run leaves no empty folder
    if run.policy_sync is not None:
        run.policy_sync.join(run.policy)
    write_json(run_dir / CONFIG_NAME, cfg.to_dict())
    if progress:
        print(f"[{cfg.name}] split: {run.data.split}\n[{cfg.name}] normalisation: {run.data.normalisation}", flush=True)
    writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
    t = cfg.train
    aug = cfg.augment
    metrics: dict[str, float] = {}
    checkpoint_path = run_dir / CHECKPOINT_NAME
    policy_path: Path | None = run_dir / POLICY_NAME if run.policy is not None else None
    try:
        while run.epoch < t.epochs:
            epoch = run.epoch
            lr = poly_lr(t.lr, epoch, t.epochs, t.poly_power)
            if run.optimizer is not None:
                set_lr(run.optimizer, lr)
            if run.tra_optimizer is not None:
                set_lr(run.tra_optimizer, poly_lr(aug.tra.lr, epoch, t.epochs, t.poly_power))
            if run.tea_optimizer is not None:
                set_lr(run.tea_optimizer, poly_lr(aug.tea.lr, epoch, t.epochs, t.poly_power))
            inner_lr = aug.tra.inner_lr or lr
            if run.policy_sync is not None:
                run.policy_sync.epoch = epoch
            started = time.perf_counter()
            losses = []
            bar = tqdm(range(t.iterations), desc=f"{cfg.name} epoch {epoch + 1}/{t.epochs}", leave=False,
                       disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
            for iteration in bar:
                # Meta-steps judge the segmenter's response to augmentation; during the warm-up it is still
                # adapting to augmented batches and that upheaval, not the validation shift, would drive them.
                meta_now = run.global_step >= aug.warmup_iterations and run.global_step % aug.meta_every == 0
                batch = run.train_sampler.sample(t.batch_size, generator=run.train_rng)
                val_batch = tea_batch = None
                if meta_now and (run.tra_optimizer is not None or run.colab is not None):
                    val_batch = run.outer_batch(t.val_batch_size)
                if meta_now and run.tea_optimizer is not None:
                    tea_batch = run.val_sampler.sample(aug.tea.groups_per_step, fg_fraction=1.0, generator=run.val_rng)
                batch, val_batch, tea_batch = (
                    _batch_to(b, run.device) if b is not None else None for b in (batch, val_batch, tea_batch)
                )
                loss = run.step.run(batch, val_batch, tea_batch, inner_lr=inner_lr, generator=run.generator)
                if loss is not None:  # None: a frozen segmenter, which has no training loss
                    losses.append(loss)
                run.global_step += 1
                if iteration % 10 == 0 and losses:
                    bar.set_postfix_str(f"loss {np.mean(losses[-10:]):.3f}")
            run.epoch += 1
            metrics = {
                "epoch": run.epoch, "step": run.global_step, "lr": lr,
                **({"train/loss": float(np.mean(losses))} if losses else {}),
                "time/epoch_s": time.perf_counter() - started,
                "meta/steps": run.step.stats.meta_steps, "tea/steps": run.step.stats.tea_steps,
                "meta/empty_group_updates": run.step.stats.empty_group_updates,
                **{f"nonfinite/{kind}": n for kind, n in run.step.guard.skipped.items()},
                "meta/val_loss": run.step.stats.last_val_loss, "tea/loss": run.step.stats.last_tea_loss,
                **run.step.stats.extra, **_policy_scalars(run.policy),
            }
            last = run.epoch == t.epochs
            validated = run.epoch % t.validate_every == 0 or last
            if validated:
                metrics.update(
                    validate(run.task_model, run.data.val, patch_size=t.patch_size, label_names=run.data.label_names,
                             rare_labels=run.rare_labels, batch_size=t.sliding_window_batch, device=run.device)
                )
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key, value, run.epoch)
            writer.flush()
            with open(run_dir / METRICS_NAME, "a") as handle:
                handle.write(dumps_json(metrics) + "\n")
            if progress:
                summary = (f" | {run.policy.summary()}"
                           if run.policy is not None and (aug.tra.learn or aug.tea.learn) else "")
                print(f"[{cfg.name}] epoch {run.epoch}/{t.epochs}{_progress_numbers(metrics, validated)}{summary}",
                      flush=True)
            report_ckpt = report_policy = None
            if run.epoch % t.checkpoint_every == 0 or validated:  # every validation comes with its checkpoint
                checkpoint_path, policy_path = _write_step(run, metrics)
                report_ckpt, report_policy = checkpoint_path, policy_path
                if run.policy_sync is not None:
                    run.policy_sync.checkpoint()
            for callback in callbacks:
                callback(EpochReport(run.epoch, metrics, report_ckpt, report_policy))
    finally:
        writer.close()
    if not checkpoint_path.is_file():
        checkpoint_path, policy_path = _write_step(run, metrics)
    return FitResult(run_dir, metrics, checkpoint_path, policy_path)
