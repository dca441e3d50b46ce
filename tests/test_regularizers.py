import pytest
import torch

from augsearch.config import LossConfig
from augsearch.errors import AugsearchError
from augsearch.losses import per_sample_loss
from augsearch.model import UNet
from augsearch.regularizers import (
    adversarial_perturbation,
    asymmetric_augment_mask,
    mixup,
    rare_restricted_loss,
    soft_target_loss,
)

RARE = torch.tensor([False, False, True])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _planted():
    """Sample 0 is all ones, sample 1 all zeros, so x_mix[0] == lambda_0 and x_mix[1] == 1 - lambda_1."""
    x = torch.stack([torch.ones(1, 4), torch.zeros(1, 4)])
    y = torch.tensor([[0, 1, 2, 0], [2, 0, 0, 1]])
    return x, y


@pytest.mark.parametrize("seed", range(12))
def test_mixup_asymmetric_label_rule(seed):
    x, y = _planted()
    margin = 0.2
    x_mix, soft, valid = mixup(x, y, 3, alpha=1.0, margin=margin, rare=RARE, asymmetric=True, generator=_gen(seed))
    lam0, lam1 = x_mix[0, 0, 0].item(), 1 - x_mix[1, 0, 0].item()
    assert 0 <= lam0 <= 1 - margin and 0 <= lam1 <= 1 - margin
    # Sample 0 (a) mixed with sample 1 (b), voxel by voxel:
    # v0: a=0, b=2 rare, b weighs 1-lam0 >= margin -> hard 2.  v1: a=1, b=0 frequent/frequent -> dropped.
    # v2: a=2 rare, b=0 -> hard 2 iff a weighs lam0 > margin, else fractional.  v3: a=0, b=1 -> dropped.
    assert valid[0].tolist() == [True, False, lam0 > margin, False]
    assert soft[0, :, 0].tolist() == pytest.approx([0, 0, 1])
    if lam0 > margin:
        assert soft[0, :, 2].tolist() == pytest.approx([0, 0, 1])
    else:
        assert soft[0, :, 2].tolist() == pytest.approx([1 - lam0, 0, lam0])
    # Sample 1 (a) mixed with sample 0 (b): v0 a=2 rare kept iff lam1 > margin; v2 b=2 rare, weight 1-lam1 >= margin.
    assert valid[1].tolist() == [lam1 > margin, False, True, False]
    assert soft[1, :, 2].tolist() == pytest.approx([0, 0, 1])


def test_mixup_never_merges_two_rare_classes():
    rare = torch.tensor([False, True, True])
    x = torch.randn(2, 1, 3, generator=_gen(0))
    y = torch.tensor([[1, 2, 0], [0, 1, 2]])  # partner of sample 0 is [0, 1, 2]
    _, soft, valid = mixup(x, y, 3, alpha=1.0, margin=0.2, rare=rare, asymmetric=True, generator=_gen(1))
    # v1 (a=2, b=1) and v2 (a=0, b=2 -> rare b kept): the rare/rare voxel stays fractional and is dropped.
    assert valid[0].tolist() == [False, False, True]


def test_mixup_symmetric_soft_labels_everywhere():
    x, y = _planted()
    x_mix, soft, valid = mixup(x, y, 3, alpha=0.4, margin=0.2, rare=RARE, asymmetric=False, generator=_gen(3))
    lam0 = x_mix[0, 0, 0].item()
    assert valid.all()
    expected = lam0 * torch.nn.functional.one_hot(y[0], 3).T + (1 - lam0) * torch.nn.functional.one_hot(y[1], 3).T
    torch.testing.assert_close(soft[0], expected.float())
    torch.testing.assert_close(soft.sum(1), torch.ones(2, 4))


def test_mixup_lambda_bound_and_reproducible():
    x = torch.stack([torch.ones(1, 2)] * 50 + [torch.zeros(1, 2)] * 50)
    y = torch.zeros(100, 2, dtype=torch.long)
    mix1, _, _ = mixup(x, y, 3, alpha=0.2, margin=0.3, rare=RARE, asymmetric=True, generator=_gen(5))
    mix2, _, _ = mixup(x, y, 3, alpha=0.2, margin=0.3, rare=RARE, asymmetric=True, generator=_gen(5))
    lam = mix1[:50, 0, 0]
    assert torch.equal(mix1, mix2)
    assert (lam <= 0.7 + 1e-7).all() and (lam >= 0).all() and lam.std() > 0
    with pytest.raises(AugsearchError, match="alpha"):
        mixup(x, y, 3, alpha=0.0, margin=0.2, rare=RARE, asymmetric=True, generator=None)


def test_soft_target_loss_equals_hard_loss_on_one_hot_targets():
    logits = torch.randn(2, 3, 4, 4, generator=_gen(6), dtype=torch.float64)
    y = torch.randint(0, 3, (2, 4, 4), generator=_gen(7))
    onehot = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).double()
    cfg = LossConfig(margin=0.5, focal_gamma=2.0)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    torch.testing.assert_close(soft_target_loss(logits, onehot, valid, cfg, RARE),
                               per_sample_loss(logits, y, cfg, RARE))
    # Dropping voxels equals zeroing their CE and leaving them out of Dice.
    valid[:, :2] = False
    cfg_ce = LossConfig(kind="ce")
    full = per_sample_loss(logits[:, :, 2:], y[:, 2:], cfg_ce, RARE)
    torch.testing.assert_close(soft_target_loss(logits, onehot, valid, cfg_ce, RARE), full / 2)


def _tiny_model():
    torch.manual_seed(0)
    return UNet(2, 1, 3, base_features=2, depth=2).double()


def test_adversarial_perturbation_norm_is_eps_per_sample():
    model = _tiny_model()
    x = torch.randn(3, 1, 8, 8, generator=_gen(8), dtype=torch.float64)
    y = torch.randint(0, 3, (3, 8, 8), generator=_gen(9))
    y[:, 0, 0] = 2
    for asymmetric in (True, False):
        r = adversarial_perturbation(model, x, y, eps=2.5, rare=RARE, asymmetric=asymmetric, generator=_gen(10))
        torch.testing.assert_close(r.flatten(1).norm(dim=1), torch.full((3,), 2.5, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())


def test_asymmetric_perturbation_ignores_non_rare_labels():
    model = _tiny_model()
    x = torch.randn(2, 1, 8, 8, generator=_gen(11), dtype=torch.float64)
    y = torch.randint(0, 2, (2, 8, 8), generator=_gen(12))
    y[:, 2:4, 2:5] = 2
    relabelled = torch.where(y == 2, y, 1 - y)  # swap the two frequent classes, keep the rare voxels
    kw = dict(xi=1e-5, eps=1.0, rare=RARE, asymmetric=True)
    r1 = adversarial_perturbation(model, x, y, generator=_gen(13), **kw)
    r2 = adversarial_perturbation(model, x, relabelled, generator=_gen(13), **kw)
    torch.testing.assert_close(r1, r2)
    # The symmetric variant sees every label, so the swap changes its direction.
    kw["asymmetric"] = False
    s1 = adversarial_perturbation(model, x, y, generator=_gen(13), **kw)
    s2 = adversarial_perturbation(model, x, relabelled, generator=_gen(13), **kw)
    assert (s1 - s2).abs().max() > 1e-3
    # No rare voxel at all: no adversarial direction.
    none = adversarial_perturbation(model, x, torch.zeros_like(y), generator=_gen(13), **{**kw, "asymmetric": True})
    assert torch.equal(none, torch.zeros_like(x))


def test_adversarial_direction_increases_the_rare_loss():
    model = _tiny_model()
    x = torch.randn(2, 1, 8, 8, generator=_gen(14), dtype=torch.float64)
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[:, 3:6, 3:6] = 2
    r = adversarial_perturbation(model, x, y, eps=0.5, rare=RARE, asymmetric=True, generator=_gen(15))
    with torch.no_grad():
        base = rare_restricted_loss(model(x), y, RARE)
        adv = rare_restricted_loss(model(x + r), y, RARE)
        rand = torch.randn(x.shape, generator=_gen(16), dtype=x.dtype)
        rand = 0.5 * rand / rand.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        noisy = rare_restricted_loss(model(x + rand), y, RARE)
    assert ((adv - base) > (noisy - base).abs()).all()


def test_asymmetric_augment_mask_statistics():
    anchor = torch.tensor([0] * 20000 + [1] * 500 + [2] * 500)
    mask = asymmetric_augment_mask(anchor, 0.3, _gen(17))
    assert mask[20000:].all()
    assert abs(mask[:20000].float().mean().item() - 0.3) < 0.015
    assert asymmetric_augment_mask(anchor, 1.0, _gen(18)).all()
    assert not asymmetric_augment_mask(anchor, 0.0, _gen(18))[:20000].any()
    with pytest.raises(AugsearchError, match="bg_augment_prob"):
        asymmetric_augment_mask(anchor, 1.5, None)
