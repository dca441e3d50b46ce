"""CoLab: a generator network that learns the background's split into context classes by meta-gradients.

The generator g_phi (a small U-Net, image -> t logits, softmax over t) gives each background voxel a soft split over
the context sub-classes K..K+t-1 (`context_labels.split_target`). Its objective is the segmenter's validation loss
on the original labels after one step on the context-extended targets (theta: the segmenter's trainable parameters,
eta: the inner step, T(phi): the extended targets of the training batch):

    theta'(phi) = theta - eta * grad_theta L_train(theta, T(phi))                   plain SGD, as the TRA meta-step
    d L_val(theta'(phi)) / d phi = -eta * grad_phi <grad_theta L_train(theta, T(phi)), v>,  v = grad L_val(theta')

L_val sees merged probabilities (the context sub-classes added to the background) against the dataset's labels.
Backends (both exact):

- ``"jvp"`` (default): v by one reverse pass at theta', then reverse-over-forward: ``torch.func.grad`` in phi of the
  ``torch.func.jvp`` of theta -> L_train(theta, T(phi)) along v. No second-order graph of the segmenter's step.
- ``"functional"``: phi enters the graph, the inner gradient is taken with ``create_graph=True`` through
  ``torch.func.functional_call`` and the outer loss is differentiated back to phi.

The segmenter's real parameters, gradients and buffers are never touched (parameters are read as detached copies,
buffers passed as clones).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from augsearch.context_labels import ContextLabelError, ContextSpec, split_target
from augsearch.model import UNet

BACKENDS = ("jvp", "functional")


@dataclass
class GeneratorGradient:
    """d L_val / d phi per generator parameter (detached), L_val after the unrolled step, and whether all is finite."""

    grads: dict[str, Tensor]
    val_loss: float
    finite: bool


def _call(model: nn.Module, params: dict[str, Tensor], x: Tensor):
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return functional_call(model, {**buffers, **params}, (x,))


def generator_split(generator: nn.Module, params: dict[str, Tensor], image: Tensor) -> Tensor:
    """The soft context split (B, t, *S) of image (B, C, *S) under generator parameters `params`."""
    logits = _call(generator, params, image)
    if isinstance(logits, list):
        logits = logits[0]
    return torch.softmax(logits, dim=1)


def generator_meta_gradient(
    segmenter: nn.Module,
    generator: nn.Module,
    spec: ContextSpec,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    *,
    inner_lr: float,
    train_loss_fn: Callable[[Any, Tensor], Tensor],
    val_loss_fn: Callable[[Any, Tensor], Tensor],
    backend: str = "jvp",
    inner_grads: dict[str, Tensor] | None = None,
) -> GeneratorGradient:
    """d L_val(theta'(phi)) / d phi (module docstring) at the current segmenter and generator.

    inner_grads: grad_theta L_train(theta, T(phi)) by parameter name when the caller has it already (the segmenter
    step's own backward on the same batch and targets): the jvp backend then takes theta' from it instead of a second
    forward and backward; the functional backend needs that gradient's graph in phi and ignores it.

    train_x (B, C, *S), train_y (B, *S) labels: the augmented training batch; val_x, val_y: the validation batch.
    train_loss_fn(segmenter output, soft target (B, K + t, *S)) -> scalar, the segmenter's training loss (mean over
    samples); val_loss_fn(segmenter output, labels) -> scalar on the dataset's labels (it merges the context outputs).
    """
    if backend not in BACKENDS:
        raise ContextLabelError(f"loss.colab_backend: expected one of {BACKENDS}, got {backend!r}")
    theta = {n: p.detach() for n, p in segmenter.named_parameters() if p.requires_grad}
    phi = {n: p.detach() for n, p in generator.named_parameters() if p.requires_grad}

    def train_loss(theta_: dict[str, Tensor], phi_: dict[str, Tensor]) -> Tensor:
        target = split_target(spec, train_y, generator_split(generator, phi_, train_x))
        return train_loss_fn(_call(segmenter, theta_, train_x), target)

    def val_loss(theta_: dict[str, Tensor]) -> Tensor:
        return val_loss_fn(_call(segmenter, theta_, val_x), val_y)

    if backend == "functional":
        grads, value = _functional(theta, phi, train_loss, val_loss, inner_lr)
    else:
        grads, value = _jvp(theta, phi, train_loss, val_loss, inner_lr, inner_grads)
    finite = math.isfinite(value) and all(bool(torch.isfinite(g).all()) for g in grads.values())
    return GeneratorGradient({n: g.detach() for n, g in grads.items()}, value, finite)


def _leaves(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def _grad(loss: Tensor, params: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, **kwargs)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def _jvp(theta, phi, train_loss, val_loss, inner_lr, inner_grads) -> tuple[dict[str, Tensor], float]:
    if inner_grads is None:
        leaves = _leaves(theta)
        inner = _grad(train_loss(leaves, phi), leaves)
    else:
        inner = {n: inner_grads[n].detach() if n in inner_grads else torch.zeros_like(p) for n, p in theta.items()}
    theta_prime = _leaves({n: p - inner_lr * inner[n] for n, p in theta.items()})
    outer = val_loss(theta_prime)
    v = _grad(outer, theta_prime)

    def directional(phi_: dict[str, Tensor]) -> Tensor:
        _, along_v = torch.func.jvp(lambda theta_: train_loss(theta_, phi_), (theta,), (v,))
        return along_v

    grads = torch.func.grad(directional)(phi)
    return {n: -inner_lr * g for n, g in grads.items()}, float(outer.detach())


def _functional(theta, phi, train_loss, val_loss, inner_lr) -> tuple[dict[str, Tensor], float]:
    theta_leaves, phi_leaves = _leaves(theta), _leaves(phi)
    inner = _grad(train_loss(theta_leaves, phi_leaves), theta_leaves, create_graph=True)
    outer = val_loss({n: p - inner_lr * inner[n] for n, p in theta_leaves.items()})
    return _grad(outer, phi_leaves), float(outer.detach())


class ColabGenerator:
    """The generator network, its Adam optimiser and the context targets it makes for the segmenter's steps.

    dims, in_channels: the images'; first_pool: the segmenter's first pool kernel (the generator's U-Net has two
    levels, so every training patch fits it). `target(image, labels)` gives the detached soft targets
    (B, K + t, *S) for the segmenter's step; `meta_update` steps the generator once.
    """

    def __init__(self, spec: ContextSpec, dims: int, in_channels: int, first_pool: list[int], *, features: int,
                 lr: float, backend: str, device: torch.device):
        self.spec = spec
        self.backend = backend
        self.network = UNet(dims, in_channels, spec.context_classes, base_features=features, depth=2,
                            pool_kernels=[list(first_pool)]).to(device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=lr)
        self.last_val_loss = float("nan")

    def target(self, image: Tensor, labels: Tensor) -> Tensor:
        """Soft extended targets (B, K + t, *S), no gradient to the generator."""
        with torch.no_grad():
            params = dict(self.network.named_parameters())
            return split_target(self.spec, labels, generator_split(self.network, params, image))

    def meta_update(self, segmenter: nn.Module, image: Tensor, labels: Tensor, val_image: Tensor, val_labels: Tensor,
                    *, inner_lr: float, train_loss_fn: Callable, val_loss_fn: Callable,
                    inner_grads: dict[str, Tensor] | None = None) -> bool:
        """One generator step on the meta-gradient; False (nothing stepped) when it is not finite. inner_grads: as
        `generator_meta_gradient`'s."""
        result = generator_meta_gradient(
            segmenter, self.network, self.spec, image, labels, val_image, val_labels, inner_lr=inner_lr,
            train_loss_fn=train_loss_fn, val_loss_fn=val_loss_fn, backend=self.backend, inner_grads=inner_grads,
        )
        self.last_val_loss = result.val_loss
        if not result.finite:
            return False
        for name, p in self.network.named_parameters():
            p.grad = result.grads[name].to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
