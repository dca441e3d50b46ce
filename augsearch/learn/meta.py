"""TRA meta-gradient (METHOD 4.2 step A): per-sample d L_val / d w_i through one unrolled SGD step.

Definitions (theta: the model's trainable parameters, B: training batch size, eta: inner step):

    l(theta)   = per_sample_loss_fn(f(theta, train_x), train_y)                     (B,)
    theta'(w)  = theta - eta * grad_theta (1/B) sum_i w_i l_i(theta)                plain SGD (METHOD 10.6)
    c_i        = d val_loss_fn(f(theta'(w), val_x), val_y) / d w_i  at w = 1
               = -(eta / B) <grad_theta l_i(theta), v>,   v = grad_{theta'} L_val(theta'(1))

Backends (same definition, same result for the exact ones):

- ``"jvp"`` (default, exact): theta' from the inner gradient, v by one reverse pass at theta', then one forward-mode
  ``torch.func.jvp`` of theta -> l(theta) at theta along v gives every <grad l_i, v> at once. No second-order graph:
  about the memory of a plain step.
- ``"functional"`` (exact): w enters the graph; the inner gradient is taken with ``create_graph=True`` through
  ``torch.func.functional_call`` and c is a second-order backward to w.
- ``"higher"`` (exact): the same unrolled step with ``higher.innerloop_ctx`` and its differentiable SGD. ``higher``
  is unmaintained since 2021; this module is the only place that imports it (lazily, inside the backend).
- ``"fd"`` (approximate): the reference's central difference along v, eps = fd_epsilon / ||v||,
  c_i = -(eta/B) [l_i(theta + eps v) - l_i(theta - eps v)] / (2 eps); two forwards, no backward on the train batch.
  Its error is O(eps^2) for smooth layers; with piecewise-linear activations (ReLU, LeakyReLU) units that switch
  sides inside the step add more (0.3% on the tiny test net at the reference's 0.01, 1e-9 at 1e-4). Use it for
  layers that forward-mode AD does not support.

Nothing on the model changes: every backend reads parameters as detached copies and passes buffers as clones, so
neither ``.grad`` nor running statistics of the real model are touched. Dropout: when the model is in training mode,
every forward on the training batch runs with the RNG seeded by ``seed`` and every forward on the validation batch
with ``seed + 1``, inside a forked RNG (the global state is restored), so the evaluations that must share a mask do.
A caller that passes ``inner_grads`` for a model with active dropout computes them inside
``same_dropout_mask(model, seed)`` for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from augsearch.errors import AugsearchError

BACKENDS = ("jvp", "functional", "higher", "fd")


class MetaGradientError(AugsearchError):
    """Bad input to the meta-gradient: unknown backend, mismatched batches, loss of the wrong shape."""


@dataclass
class MetaResult:
    """Outcome of one TRA meta-gradient.

    coefficients: (B,) detached, d L_val / d w_i at w = 1; zeros when ``finite`` is False.
    val_loss: L_val(theta'(1)), the outer loss after the unrolled step.
    finite: False when the outer loss or any coefficient is NaN/inf: the caller skips the policy update and counts it.
    """

    coefficients: Tensor
    val_loss: float
    finite: bool


@contextmanager
def same_dropout_mask(model: nn.Module, seed: int) -> Iterator[None]:
    """Run the enclosed forwards with the RNG seeded by ``seed`` in a fork, so dropout masks repeat across blocks.

    Does nothing in eval mode. The CPU generator and, for a CUDA model, its device's generator are seeded; the global
    RNG state is restored on exit, so calling this consumes no global randomness.
    """
    if not model.training:
        yield
        return
    device = _device_of(model)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def tra_meta_coefficients(
    model: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    *,
    inner_lr: float,
    per_sample_loss_fn: Callable[[Tensor, Tensor], Tensor],
    val_loss_fn: Callable[[Tensor, Tensor], Tensor],
    backend: str = "jvp",
    inner_grads: dict[str, Tensor] | None = None,
    fd_epsilon: float = 0.01,
    seed: int = 0,
    preconditioner: dict[str, Tensor] | None = None,
) -> MetaResult:
    """Per-sample meta-gradient c_i = d L_val(theta'(w)) / d w_i at w = 1 (see the module docstring).

    model: the segmenter f; its trainable parameters are theta, its buffers are used as they are (cloned per call).
    train_x (B, C, *S), train_y (B, *S): the (augmented) training batch; val_x, val_y: the validation batch.
    per_sample_loss_fn(model output, target) -> (B,); val_loss_fn(model output, target) -> scalar. The model output
    is passed as the model returns it (a list under deep supervision).
    inner_grads: name -> grad_theta of mean_i l_i(theta) (``{n: p.grad}`` after the segmenter step's own backward), so
    the inner gradient is computed once; a name absent or None means a zero gradient; None computes it. Used by
    "jvp" and "fd"; "functional" and "higher" need w in the graph and recompute it.
    fd_epsilon: step of "fd" along v / ||v||. seed: dropout seed (module docstring).
    preconditioner: name -> P (shaped like the parameter), a diagonal geometry for the inner step: theta' = theta -
    eta P * grad and c_i = -(eta / B) <grad l_i, P * v> (the tangent of "jvp", the direction of "fd"). None is the
    identity (plain SGD).
    Returns MetaResult with coefficients (B,) in the loss dtype, on the model's device.
    """
    if backend not in BACKENDS:
        raise MetaGradientError(f"backend: expected one of {BACKENDS}, got {backend!r}; pick one of those names.")
    batch = _check_batches(train_x, train_y, val_x, val_y)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise MetaGradientError("model: expected trainable parameters, got none; unfreeze the segmenter.")
    problem = _Problem(model, train_x, train_y, val_x, val_y, per_sample_loss_fn, val_loss_fn, batch, seed)

    if preconditioner is not None and backend not in ("jvp", "fd"):
        raise MetaGradientError(f"preconditioner: supported by the 'jvp' and 'fd' backends, got backend {backend!r}; "
                                f"switch the backend or turn augment.tra.precondition off.")
    scale = (lambda n, t: t * preconditioner[n]) if preconditioner is not None else (lambda n, t: t)

    if backend == "functional":
        coefficients, val_loss = _functional(problem, params, inner_lr)
    elif backend == "higher":
        coefficients, val_loss = _higher(problem, inner_lr)
    else:
        grads = problem.inner_grads(params) if inner_grads is None else _check_inner_grads(inner_grads, params)
        val_loss, v = problem.val_grad({n: p - inner_lr * scale(n, grads[n]) for n, p in params.items()})
        if not math.isfinite(val_loss):
            return _skipped(batch, params, val_loss)
        v = {n: scale(n, t) for n, t in v.items()}
        directional = problem.jvp(params, v) if backend == "jvp" else problem.finite_difference(params, v, fd_epsilon)
        coefficients = -(inner_lr / batch) * directional

    coefficients = coefficients.detach()
    if not (math.isfinite(val_loss) and bool(torch.isfinite(coefficients).all())):
        return _skipped(batch, params, val_loss)
    return MetaResult(coefficients, val_loss, True)


def centre_and_normalise(
    coefficients: Tensor,
    group_idx: Tensor,
    bins: Tensor,
    *,
    baseline: bool = True,
    count_normalization: bool = True,
    running_baseline: Tensor | None = None,
) -> Tensor:
    """Variance control of METHOD 4.2 step 8: per-op gradient coefficients (B, n_ops) for the TRA logits.

    coefficients (B,): c from ``tra_meta_coefficients``; group_idx (B,) int64: class group of each sample;
    bins (B, n_ops) int64: the bin each sample drew for each op.
    baseline: subtract the mean of c within each class group. count_normalization: divide sample i's entry for op k by
    N_{g,k}(a_ik), the number of samples of the same group that drew the same bin of op k.
    running_baseline (G,): per-group baseline from earlier steps, used for a group with fewer than 2 samples in the
    batch (its own mean would cancel its single sample exactly, leaving no gradient); None keeps the batch mean.

    Usage: with the straight-through weights ``st = policy.tra_weights(group_idx, bins, generator)`` (B, n_ops),
    value 1, ``torch.autograd.backward(st, grad_tensors=centre_and_normalise(c, group_idx, bins))`` puts
    sum_{i,k} G_ik d w_ik / d phi into the logits' ``.grad``, i.e. METHOD 4.2 step 9 (the -eta factor is inside c).
    """
    if coefficients.dim() != 1 or group_idx.shape != coefficients.shape or bins.dim() != 2 \
            or bins.shape[0] != coefficients.shape[0]:
        raise MetaGradientError(
            f"shapes: expected coefficients (B,), group_idx (B,), bins (B, n_ops), got {tuple(coefficients.shape)}, "
            f"{tuple(group_idx.shape)}, {tuple(bins.shape)}; pass one row per training sample."
        )
    centred = coefficients
    if baseline:
        means, counts = group_means(coefficients, group_idx, 0 if running_baseline is None else len(running_baseline))
        if running_baseline is not None:
            means = torch.where(counts < 2, running_baseline.to(means), means)
        centred = coefficients - means[group_idx]
    out = centred[:, None].expand(bins.shape).clone()
    if count_normalization:
        n_ops = bins.shape[1]
        n_bins = int(bins.max()) + 1
        op = torch.arange(n_ops, device=bins.device)
        keys = (group_idx[:, None] * n_ops + op) * n_bins + bins  # one key per (group, op, bin)
        _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        out = out / counts[inverse].to(out.dtype)
    return out


def group_means(values: Tensor, group_idx: Tensor, n_groups: int = 0) -> tuple[Tensor, Tensor]:
    """Per-group mean of values (B,) and sample count, both (max(n_groups, max group + 1),); 0 for empty groups."""
    n_groups = max(n_groups, int(group_idx.max()) + 1)
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    sums.index_add_(0, group_idx, values)
    counts = torch.bincount(group_idx, minlength=n_groups).to(values.dtype)
    return sums / counts.clamp_min(1), counts


def tea_coefficients(
    view_losses: Tensor,
    entry_ids: Tensor,
    *,
    baseline: bool = True,
    count_normalization: bool = True,
) -> Tensor:
    """TEA gradient coefficients of METHOD 4.2 step B items 5-6, one per view, shape (Z,).

    view_losses (Z,): D_z, the loss of view z after inversion; entry_ids (Z,) int64: its TEA pool id.
    The ensemble loss L = sum_z w_z D_z / sum_z w_z at w = 1 gives dL/dw_z = (D_z - L) / Z. baseline subtracts the
    mean over z; for this loss the mean is already zero, so it only removes rounding (kept so TRA and TEA share one
    switch). count_normalization divides by the number of views with the same id. Feed the result as
    ``grad_tensors`` for the straight-through TEA weights (Z,), as in ``centre_and_normalise``.
    """
    if view_losses.dim() != 1 or entry_ids.shape != view_losses.shape:
        raise MetaGradientError(
            f"shapes: expected view_losses (Z,) and entry_ids (Z,), got {tuple(view_losses.shape)} and "
            f"{tuple(entry_ids.shape)}; pass one loss and one pool id per view."
        )
    views = view_losses.shape[0]
    coefficients = (view_losses - view_losses.mean()) / views
    if baseline:
        coefficients = coefficients - coefficients.mean()
    if count_normalization:
        _, inverse, counts = torch.unique(entry_ids, return_inverse=True, return_counts=True)
        coefficients = coefficients / counts[inverse].to(coefficients.dtype)
    return coefficients


@dataclass
class _Problem:
    """The bilevel objective: forwards on both batches with cloned buffers and the dropout seeds."""

    model: nn.Module
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    per_sample_loss_fn: Callable[[Tensor, Tensor], Tensor]
    val_loss_fn: Callable[[Tensor, Tensor], Tensor]
    batch: int
    seed: int

    def _call(self, params: dict[str, Tensor], x: Tensor):
        # Cloned buffers: a norm layer that tracks running stats updates the clones, never the model's own.
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return functional_call(self.model, {**buffers, **params}, (x,))

    def train_losses(self, params: dict[str, Tensor]) -> Tensor:
        """l(theta) (B,), same dropout mask on every call."""
        with same_dropout_mask(self.model, self.seed):
            losses = self.per_sample_loss_fn(self._call(params, self.train_x), self.train_y)
        if losses.shape != (self.batch,):
            raise MetaGradientError(
                f"per_sample_loss_fn: expected a loss per training sample, shape ({self.batch},), got "
                f"{tuple(losses.shape)}; reduce over every axis but the batch axis."
            )
        return losses

    def val_loss(self, params: dict[str, Tensor]) -> Tensor:
        """L_val(params), a scalar, same dropout mask on every call."""
        with same_dropout_mask(self.model, self.seed + 1):
            loss = self.val_loss_fn(self._call(params, self.val_x), self.val_y)
        if loss.dim() != 0:
            raise MetaGradientError(
                f"val_loss_fn: expected a scalar, got shape {tuple(loss.shape)}; reduce the validation loss to one "
                "number."
            )
        return loss

    def inner_grads(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        grads = torch.autograd.grad(self.train_losses(leaves).mean(), list(leaves.values()), allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}

    def val_grad(self, theta_prime: dict[str, Tensor]) -> tuple[float, dict[str, Tensor]]:
        """(L_val(theta'), v = grad L_val at theta')."""
        leaves = {n: p.detach().requires_grad_() for n, p in theta_prime.items()}
        loss = self.val_loss(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        v = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(leaves.items(), grads)}
        return float(loss.detach()), v

    def jvp(self, params: dict[str, Tensor], v: dict[str, Tensor]) -> Tensor:
        """<grad l_i(theta), v> for every i (B,), by one forward-mode pass."""
        _, directional = torch.func.jvp(self.train_losses, (params,), (v,))
        return directional

    def finite_difference(self, params: dict[str, Tensor], v: dict[str, Tensor], fd_epsilon: float) -> Tensor:
        """Central difference of l along v (B,), the reference's approximation of <grad l_i, v>."""
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in v.values()))
        if float(norm) == 0.0:
            return torch.zeros(self.batch, dtype=next(iter(params.values())).dtype, device=norm.device)
        eps = fd_epsilon / float(norm)
        with torch.no_grad():
            plus = self.train_losses({n: p + eps * v[n] for n, p in params.items()})
            minus = self.train_losses({n: p - eps * v[n] for n, p in params.items()})
        return (plus - minus) / (2 * eps)


def _functional(problem: _Problem, params: dict[str, Tensor], inner_lr: float) -> tuple[Tensor, float]:
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    losses = problem.train_losses(leaves)
    w = torch.ones_like(losses, requires_grad=True)
    grads = torch.autograd.grad((w * losses).mean(), list(leaves.values()), create_graph=True, allow_unused=True)
    theta_prime = {n: p if g is None else p - inner_lr * g for (n, p), g in zip(leaves.items(), grads)}
    val = problem.val_loss(theta_prime)
    (coefficients,) = torch.autograd.grad(val, w, allow_unused=True, materialize_grads=True)
    return coefficients, float(val.detach())


def _higher(problem: _Problem, inner_lr: float) -> tuple[Tensor, float]:
    import higher  # unmaintained since 2021: imported only here, only when this backend is asked for

    model = problem.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(trainable, lr=inner_lr)  # plain SGD: no momentum, no weight decay (METHOD 10.6)
    # copy_initial_weights=True: the fast weights start as detached copies, so no graph reaches the real parameters
    # (their .grad stays as it was) and w is the only leaf we differentiate to; higher also clones the buffers.
    with higher.innerloop_ctx(model, optimiser, copy_initial_weights=True, track_higher_grads=True) as (fmodel, opt):
        with same_dropout_mask(model, problem.seed):
            losses = problem.per_sample_loss_fn(fmodel(problem.train_x), problem.train_y)
        w = torch.ones_like(losses, requires_grad=True)
        opt.step((w * losses).mean())
        with same_dropout_mask(model, problem.seed + 1):
            val = problem.val_loss_fn(fmodel(problem.val_x), problem.val_y)
        (coefficients,) = torch.autograd.grad(val, w, allow_unused=True, materialize_grads=True)
    return coefficients, float(val.detach())


def _check_batches(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor) -> int:
    if train_x.shape[0] != train_y.shape[0] or val_x.shape[0] != val_y.shape[0] or train_x.shape[0] == 0:
        raise MetaGradientError(
            f"batches: expected images and targets with the same non-zero batch size, got train "
            f"{tuple(train_x.shape)} / {tuple(train_y.shape)}, val {tuple(val_x.shape)} / {tuple(val_y.shape)}; "
            "pass matching (B, C, *S) images and (B, *S) targets."
        )
    return int(train_x.shape[0])


def _check_inner_grads(inner_grads: dict[str, Tensor | None], params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Validate the caller's inner gradient; a parameter absent or None had no gradient, i.e. zero."""
    unknown = sorted(set(inner_grads) - set(params))
    if unknown or not inner_grads:
        raise MetaGradientError(
            f"inner_grads: expected gradients keyed by trainable parameter names, got unknown names {unknown[:5]} "
            f"among {len(inner_grads)}; pass {{name: p.grad for name, p in model.named_parameters()}} after the "
            "segmenter step's backward."
        )
    grads = {}
    for name, p in params.items():
        g = inner_grads.get(name)
        if g is not None and g.shape != p.shape:
            raise MetaGradientError(
                f"inner_grads[{name!r}]: expected shape {tuple(p.shape)}, got {tuple(g.shape)}; pass p.grad as is."
            )
        grads[name] = torch.zeros_like(p) if g is None else g.detach()
    return grads


def _skipped(batch: int, params: dict[str, Tensor], val_loss: float) -> MetaResult:
    p = next(iter(params.values()))
    return MetaResult(torch.zeros(batch, dtype=p.dtype, device=p.device), val_loss, False)


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")
