"""TRA meta-gradient backends against each other, against brute force in w, and the TRA/TEA coefficient helpers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from augsearch.learn.meta import (
    BACKENDS,
    MetaGradientError,
    centre_and_normalise,
    same_dropout_mask,
    tea_coefficients,
    tra_meta_coefficients,
)

EXACT = ("jvp", "functional", "higher")
LR = 0.5


def per_sample_ce(logits, target):
    return F.cross_entropy(logits, target, reduction="none").mean(dim=(1, 2))


def batch_ce(logits, target):
    return F.cross_entropy(logits, target)


def tiny_net(norm="instance", dropout=0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 4, 3, padding=1)]
    layers.append(nn.InstanceNorm2d(4, affine=True) if norm == "instance" else nn.BatchNorm2d(4))
    layers += [nn.LeakyReLU(0.01), nn.Dropout2d(dropout), nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.01),
               nn.Conv2d(4, 3, 1)]
    return nn.Sequential(*layers).double().train()


def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 8, 8), generator=g)
    xv = torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 3, (4, 8, 8), generator=g)
    return x, y, xv, yv


def meta(model, backend, **kwargs):
    x, y, xv, yv = batches()
    kwargs.setdefault("per_sample_loss_fn", per_sample_ce)
    kwargs.setdefault("val_loss_fn", batch_ce)
    return tra_meta_coefficients(model, x, y, xv, yv, inner_lr=LR, backend=backend, **kwargs)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_exact_backends_agree_and_fd_approximates():
    model = tiny_net()
    results = {b: meta(model, b) for b in BACKENDS}
    ref = results["functional"]
    assert ref.finite and ref.coefficients.abs().min() > 1e-6
    for b in ("jvp", "higher"):
        assert results[b].finite
        assert rel_err(results[b].coefficients, ref.coefficients) < 1e-10
        assert results[b].val_loss == pytest.approx(ref.val_loss, rel=1e-12)
    # The reference step (fd_epsilon 0.01) is approximate: LeakyReLU units switching sides inside the step dominate
    # the error here (0.28%); a step small enough that none switches leaves only rounding.
    assert 1e-4 < rel_err(results["fd"].coefficients, ref.coefficients) < 1e-2
    assert rel_err(meta(model, "fd", fd_epsilon=1e-4).coefficients, ref.coefficients) < 1e-7


def test_coefficients_match_brute_force_in_w():
    """Central difference of L_val(theta'(w)) in each w_i, with theta' built by a plain SGD step on a model copy."""
    model = tiny_net()
    x, y, xv, yv = batches()

    def outer(w):
        m = copy.deepcopy(model)
        grads = torch.autograd.grad((w * per_sample_ce(m(x), y)).mean(), list(m.parameters()))
        with torch.no_grad():
            for p, g in zip(m.parameters(), grads):
                p -= LR * g
            return batch_ce(m(xv), yv)

    h = 1e-5
    brute = torch.stack([
        (outer(1 + h * e) - outer(1 - h * e)) / (2 * h)
        for e in torch.eye(4, dtype=torch.float64)
    ])
    for b in EXACT:
        assert rel_err(meta(model, b).coefficients, brute) < 1e-7


def test_model_parameters_grads_and_running_stats_untouched():
    for norm in ("instance", "batch"):
        model = tiny_net(norm)
        params = list(model.parameters())
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, 0.25) if i % 2 else None
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for b in BACKENDS:
            assert meta(model, b).finite
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), (norm, b)
            for i, p in enumerate(params):
                assert (p.grad is None) if i % 2 == 0 else torch.equal(p.grad, torch.full_like(p, 0.25)), (norm, b)


def test_inner_grads_from_caller_match_computed():
    model = tiny_net()
    x, y, _, _ = batches()
    per_sample_ce(model(x), y).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for b in ("jvp", "fd"):
        given = meta(model, b, inner_grads=grads).coefficients
        assert torch.allclose(given, meta(model, b).coefficients, rtol=1e-12, atol=0)
    with pytest.raises(MetaGradientError, match="unknown names"):
        meta(model, "jvp", inner_grads={"not.a.parameter": torch.zeros(1)})


def test_dropout_masks_repeat_and_global_rng_is_untouched():
    model = tiny_net(dropout=0.5)
    x, y, _, _ = batches()
    state = torch.get_rng_state()
    results = {b: meta(model, b) for b in BACKENDS}
    assert torch.equal(torch.get_rng_state(), state)
    for b in ("jvp", "higher"):
        assert rel_err(results[b].coefficients, results["functional"].coefficients) < 1e-10
    assert rel_err(results["fd"].coefficients, results["functional"].coefficients) < 1e-2
    # A caller's inner gradient under the same seed sees the same mask as the backend's own.
    with same_dropout_mask(model, 0):
        per_sample_ce(model(x), y).mean().backward()
    given = meta(model, "jvp", inner_grads={n: p.grad for n, p in model.named_parameters()})
    assert rel_err(given.coefficients, results["jvp"].coefficients) < 1e-12


def test_non_finite_outer_loss_is_reported_not_raised():
    model = tiny_net()
    for b in BACKENDS:
        result = meta(model, b, val_loss_fn=lambda o, t: batch_ce(o, t) * float("nan"))
        assert not result.finite
        assert torch.equal(result.coefficients, torch.zeros(4, dtype=torch.float64))


def test_bad_input_raises_meta_gradient_error():
    model = tiny_net()
    with pytest.raises(MetaGradientError, match="backend"):
        meta(model, "hessian")
    with pytest.raises(MetaGradientError, match="per_sample_loss_fn"):
        meta(model, "jvp", per_sample_loss_fn=batch_ce)
    with pytest.raises(MetaGradientError, match="val_loss_fn"):
        meta(model, "functional", val_loss_fn=per_sample_ce)


def planted():
    c = torch.tensor([1.0, 3.0, 2.0, 6.0, 4.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 1])
    bins = torch.tensor([[0, 1], [0, 2], [1, 1], [1, 1], [0, 1]])
    return c, group, bins


def test_centre_and_normalise_planted():
    c, group, bins = planted()
    # group means 2 and 4 -> centred [-1, 1 | -2, 2, 0]; counts op0 [2, 2 | 2, 2, 1], op1 [1, 1 | 3, 3, 3]
    # (bin 1 of op 1 is drawn in both groups but counted per group).
    expected = torch.tensor([[-0.5, -1.0], [0.5, 1.0], [-1.0, -2 / 3], [1.0, 2 / 3], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(centre_and_normalise(c, group, bins), expected, atol=1e-15)
    raw = torch.tensor([[0.5, 1.0], [1.5, 3.0], [1.0, 2 / 3], [3.0, 2.0], [4.0, 4 / 3]], dtype=torch.float64)
    assert torch.allclose(centre_and_normalise(c, group, bins, baseline=False), raw, atol=1e-15)
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0], dtype=torch.float64)[:, None].expand(5, 2)
    assert torch.equal(centre_and_normalise(c, group, bins, count_normalization=False), centred)


def test_gradient_reaches_every_chosen_bin_logit_through_straight_through_weights():
    # No (group, op) has all its samples on one bin, where the centred coefficients would cancel exactly.
    c = torch.tensor([1.0, 3.0, 2.0, 6.0, 5.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 1])
    bins = torch.tensor([[0, 1], [1, 2], [1, 0], [1, 2], [2, 2]])
    logits = torch.randn(2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probs = logits.softmax(-1)
    y = probs[group[:, None], torch.arange(2), bins]  # (B, n_ops) probability of each chosen bin
    st = 1 + y - y.detach()
    assert torch.allclose(st.detach(), torch.ones(5, 2, dtype=torch.float64), atol=1e-15)
    grad_tensors = centre_and_normalise(c, group, bins)
    torch.autograd.backward(st, grad_tensors=grad_tensors)
    p = probs.detach()
    expected = torch.zeros_like(p)
    for i in range(5):
        for k in range(2):
            g, a = group[i], bins[i, k]
            expected[g, k] += grad_tensors[i, k] * p[g, k, a] * (F.one_hot(a, 3) - p[g, k])
    assert torch.allclose(logits.grad, expected, atol=1e-15)
    chosen = logits.grad[group[:, None], torch.arange(2), bins]
    assert (chosen.abs() > 1e-3).all()


def test_tea_coefficients_planted():
    losses = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    ids = torch.tensor([5, 7, 5, 9])
    # (D - mean D) / Z = [-0.075, -0.025, 0.025, 0.075]; id 5 appears twice.
    expected = torch.tensor([-0.0375, -0.025, 0.0125, 0.075], dtype=torch.float64)
    assert torch.allclose(tea_coefficients(losses, ids), expected, atol=1e-15)
    assert torch.allclose(tea_coefficients(losses, ids, count_normalization=False),
                          torch.tensor([-0.075, -0.025, 0.025, 0.075], dtype=torch.float64), atol=1e-15)


def test_unet_exact_backends_agree():
    model_module = pytest.importorskip("augsearch.model", reason="augsearch.model.UNet not available yet")
    torch.manual_seed(0)
    # Deep supervision on, loss on the full-resolution head only: the other heads get no gradient (allow_unused path).
    model = model_module.UNet(2, 1, 3, base_features=4, max_features=8, depth=3, deep_supervision=True).double()
    model.train()
    g = torch.Generator().manual_seed(2)
    x, xv = (torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    y, yv = (torch.randint(0, 3, (2, 16, 16), generator=g) for _ in range(2))
    kwargs = dict(inner_lr=0.1, per_sample_loss_fn=lambda o, t: per_sample_ce(o[0], t),
                  val_loss_fn=lambda o, t: batch_ce(o[0], t))
    results = {b: tra_meta_coefficients(model, x, y, xv, yv, backend=b, **kwargs) for b in EXACT}
    ref = results["functional"].coefficients
    assert results["functional"].finite and ref.abs().min() > 0
    for b in ("jvp", "higher"):
        assert rel_err(results[b].coefficients, ref) < 1e-10


def test_unet_with_project_losses_jvp_matches_functional():
    """Forward-mode AD covers the project's losses (CE + soft Dice with margin and focal, batch CE + Dice)."""
    model_module = pytest.importorskip("augsearch.model", reason="augsearch.model.UNet not available yet")
    losses = pytest.importorskip("augsearch.losses", reason="augsearch.losses not available yet")
    from augsearch.config import LossConfig

    torch.manual_seed(0)
    model = model_module.UNet(2, 1, 3, base_features=4, max_features=8, depth=3, deep_supervision=True).double()
    model.train()
    cfg = LossConfig(margin=0.5, focal_gamma=1.0)
    rare = torch.tensor([False, True, True])
    g = torch.Generator().manual_seed(3)
    x, xv = (torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    y, yv = (torch.randint(0, 3, (3, 16, 16), generator=g) for _ in range(2))
    kwargs = dict(
        inner_lr=0.1,
        per_sample_loss_fn=lambda o, t: losses.deep_supervision_loss(o, t, cfg, rare),
        val_loss_fn=lambda o, t: losses.batch_loss(o[0], t, "ce_dice", [1, 2]),
    )
    jvp = tra_meta_coefficients(model, x, y, xv, yv, backend="jvp", **kwargs)
    functional = tra_meta_coefficients(model, x, y, xv, yv, backend="functional", **kwargs)
    assert jvp.finite and functional.coefficients.abs().min() > 0
    assert rel_err(jvp.coefficients, functional.coefficients) < 1e-10


@pytest.mark.gpu
def test_cuda_backends_agree_with_dropout_and_leave_rng_alone():
    model = tiny_net(dropout=0.5).cuda()
    x, y, xv, yv = (t.cuda() for t in batches())
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    results = {
        b: tra_meta_coefficients(model, x, y, xv, yv, inner_lr=LR, per_sample_loss_fn=per_sample_ce,
                                 val_loss_fn=batch_ce, backend=b)
        for b in BACKENDS
    }
    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.equal(torch.cuda.get_rng_state(), cuda_state)
    ref = results["functional"].coefficients
    assert ref.device.type == "cuda" and ref.abs().min() > 0
    for b in ("jvp", "higher"):
        assert rel_err(results[b].coefficients, ref) < 1e-8
    assert rel_err(results["fd"].coefficients, ref) < 1e-2
