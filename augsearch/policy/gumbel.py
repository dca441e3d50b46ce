"""Gumbel machinery for categorical policies (shape-agnostic: the last axis holds the categories).

A policy gradient reaches the logits through per-sample weights: a sample whose bins were drawn from the policy gets
the weight w = 1 + (y_a - stop_grad(y_a)), with y = softmax((phi + G) / tau) and G a Gumbel draw conditioned on
argmax(phi + G) = a (METHOD 3.1). Its value is exactly 1, its gradient is d y_a / d phi. The conditional draw is
exact and loop-free (top-down truncated Gumbel: the maximum is Gumbel(logsumexp(phi)), the others are Gumbels
truncated below it), instead of the reference's rejection loop (METHOD 10.3).

The score-function (REINFORCE) alternative, `score_function`, gives a weight of value 1 whose gradient is
d log p_a / d phi: sum_i f_i d w_i / d phi is then an unbiased estimate of d E[f] / d phi for per-sample values f_i
that do not depend on phi, where the straight-through gradient is biased (and has lower variance).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Gumbel machinery (shape-agnostic: the last axis holds the categories)


def _gumbel(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise of `shape` on `like`'s device and dtype."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    info = torch.finfo(like.dtype)
    # Keep log(log(u)) finite at both ends of [0, 1).
    u = u.clamp(info.tiny, 1.0 - info.eps)
    return -torch.log(-torch.log(u))


def gumbel_max(masked_logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One categorical draw per row: (..., K) logits with -inf where unavailable -> (...,) int64."""
    return (masked_logits + _gumbel(tuple(masked_logits.shape), masked_logits, generator)).argmax(-1)


def conditional_gumbel(masked_logits: Tensor, index: Tensor, generator: torch.Generator | None) -> Tensor:
    """Perturbed logits phi + G, drawn from the Gumbel-max joint conditioned on argmax(phi + G) = index.

    masked_logits (..., K) with -inf at unavailable categories; index (...,) int64 -> (..., K), -inf stays -inf.
    The maximum is Gumbel with location logsumexp(phi) (it is independent of which category wins); every other
    category is a Gumbel(phi_i) truncated below that maximum: -log(exp(-top) + exp(-g_i)).
    """
    phi = masked_logits.detach()
    top = torch.logsumexp(phi, -1, keepdim=True) + _gumbel(tuple(phi.shape[:-1]) + (1,), phi, generator)
    g = phi + _gumbel(tuple(phi.shape), phi, generator)
    others = -torch.logaddexp(-top, -g)
    return others.scatter(-1, index.unsqueeze(-1), top)


def straight_through(masked_logits: Tensor, perturbed: Tensor, index: Tensor, tau: float) -> Tensor:
    """Weight with value exactly 1 and gradient d softmax((phi + G) / tau)_index / d phi, G = perturbed - phi fixed.

    masked_logits (..., K) (carries the gradient), perturbed (..., K) from `conditional_gumbel`, index (...,) -> (...,).
    """
    available = torch.isfinite(masked_logits.detach())
    noise = torch.where(available, perturbed - masked_logits.detach(), torch.zeros_like(perturbed))
    y = torch.softmax((masked_logits + noise) / tau, dim=-1)
    y_a = y.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    # y_a - y_a is exactly 0 in floating point, so the value is exactly 1.
    return 1.0 + (y_a - y_a.detach())


def score_function(masked_logits: Tensor, index: Tensor) -> Tensor:
    """Weight with value exactly 1 and gradient d log softmax(phi)_index / d phi = onehot(index) - softmax(phi).

    masked_logits (..., K) with -inf at unavailable categories (carries the gradient), index (...,) -> (...,).
    """
    log_p = torch.log_softmax(masked_logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return torch.exp(log_p - log_p.detach())  # exp(0) is exactly 1


def log_mask(mask: Tensor, like: Tensor) -> Tensor:
    """0 where mask, -inf elsewhere: uniform logits over the allowed categories."""
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, -math.inf)
