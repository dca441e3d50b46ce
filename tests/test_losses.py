import math

import pytest
import torch

from augsearch.config import LossConfig
from augsearch.errors import AugsearchError
from augsearch.losses import (
    batch_loss,
    deep_supervision_loss,
    deep_supervision_weights,
    per_sample_loss,
    rare_mask,
    soft_dice_per_class,
)

# Two voxels, three classes: voxel 0 is class 1, voxel 1 is class 2 (rare).
Z = [[2.0, 0.5, -1.0], [0.3, -0.2, 1.1]]
Y = [1, 2]
RARE = torch.tensor([False, False, True])


def _logits():
    return torch.tensor(Z, dtype=torch.float64).T.reshape(1, 3, 2)


def _target():
    return torch.tensor([Y])


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _hand_ce(margin_on, focal_on, m, gamma):
    """Per-voxel -F log(q_y + 1e-6), averaged; margin_on/focal_on: classes where margin / focal act."""
    total = 0.0
    for z, y in zip(Z, Y):
        shifted = [v - (m if (c == y and c in margin_on) else 0.0) for c, v in enumerate(z)]
        q = _softmax(shifted)[y]
        factor = (1 - q + 1e-6) ** gamma if y in focal_on else 1.0
        total += -factor * math.log(q + 1e-6)
    return total / len(Z)


def _hand_dice(focal_on, gamma):
    """mean over classes 1, 2 of (FP + FN_F) / (2TP + FP + FN + 1e-5)."""
    losses = []
    for c in (1, 2):
        tp = fp = fn = fnf = 0.0
        for z, y in zip(Z, Y):
            p, t = _softmax(z)[c], float(y == c)
            tp += p * t
            fp += p * (1 - t)
            fn += (1 - p) * t
            fnf += (1 - p) * t * ((1 - p + 1e-6) ** gamma if c in focal_on else 1.0)
        losses.append((fp + fnf) / (2 * tp + fp + fn + 1e-5))
    return sum(losses) / 2


def _loss(**kw):
    return per_sample_loss(_logits(), _target(), LossConfig(**kw), RARE).item()


def test_plain_ce_dice_match_hand_values():
    assert _loss(kind="ce") == pytest.approx(_hand_ce(set(), set(), 0, 0), rel=1e-12)
    assert _loss(kind="dice") == pytest.approx(_hand_dice(set(), 0), rel=1e-12)
    assert _loss(kind="ce_dice") == pytest.approx(_hand_ce(set(), set(), 0, 0) + _hand_dice(set(), 0), rel=1e-12)
    # With F = 1 the Dice term is 1 - smoothed Dice.
    dice = 1 - _hand_dice(set(), 0)
    p = [_softmax(z) for z in Z]
    d1 = (2 * p[0][1] + 1e-5) / (2 * p[0][1] + p[1][1] + (1 - p[0][1]) + 1e-5)
    d2 = (2 * p[1][2] + 1e-5) / (2 * p[1][2] + p[0][2] + (1 - p[1][2]) + 1e-5)
    assert dice == pytest.approx((d1 + d2) / 2, rel=1e-12)


def test_margin_asymmetric_and_symmetric_match_hand_values():
    asym = _loss(kind="ce", margin=0.7, asymmetric=True)
    sym = _loss(kind="ce", margin=0.7, asymmetric=False)
    assert asym == pytest.approx(_hand_ce({2}, set(), 0.7, 0), rel=1e-12)
    assert sym == pytest.approx(_hand_ce({0, 1, 2}, set(), 0.7, 0), rel=1e-12)
    assert sym > asym > _loss(kind="ce")


def test_focal_asymmetric_and_symmetric_match_hand_values():
    for kind in ("ce", "dice", "ce_dice"):
        asym = _loss(kind=kind, focal_gamma=2.0, asymmetric=True)
        sym = _loss(kind=kind, focal_gamma=2.0, asymmetric=False)
        ce_a, ce_s = _hand_ce(set(), {0, 1}, 0, 2.0), _hand_ce(set(), {0, 1, 2}, 0, 2.0)
        dice_a, dice_s = _hand_dice({1}, 2.0), _hand_dice({1, 2}, 2.0)
        want_a = {"ce": ce_a, "dice": dice_a, "ce_dice": ce_a + dice_a}[kind]
        want_s = {"ce": ce_s, "dice": dice_s, "ce_dice": ce_s + dice_s}[kind]
        assert asym == pytest.approx(want_a, rel=1e-12)
        assert sym == pytest.approx(want_s, rel=1e-12)


def test_margin_and_focal_together():
    got = _loss(kind="ce_dice", margin=0.5, focal_gamma=3.0)
    assert got == pytest.approx(_hand_ce({2}, {0, 1}, 0.5, 3.0) + _hand_dice({1}, 3.0), rel=1e-12)


def test_asymmetric_equals_symmetric_twin():
    """Margin: asymmetric with every class rare == symmetric. Focal: rare classes are exempt from focal modulation,
    so asymmetric focal with no class rare == symmetric focal (and with every class rare == no focal at all)."""
    logits = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.randint(0, 4, (3, 5, 6), generator=torch.Generator().manual_seed(1))
    every, none_ = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    for kind in ("ce", "dice", "ce_dice"):
        margin = dict(kind=kind, margin=1.3)
        torch.testing.assert_close(
            per_sample_loss(logits, target, LossConfig(**margin, asymmetric=True), every),
            per_sample_loss(logits, target, LossConfig(**margin, asymmetric=False), none_),
        )
        focal = dict(kind=kind, focal_gamma=2.5)
        torch.testing.assert_close(
            per_sample_loss(logits, target, LossConfig(**focal, asymmetric=True), none_),
            per_sample_loss(logits, target, LossConfig(**focal, asymmetric=False), every),
        )
        torch.testing.assert_close(
            per_sample_loss(logits, target, LossConfig(**focal, asymmetric=True), every),
            per_sample_loss(logits, target, LossConfig(kind=kind), every),
        )


@pytest.mark.parametrize("labels", [(0,), (0, 1)])
@pytest.mark.parametrize("kw", [{}, {"margin": 1.0, "focal_gamma": 2.0}, {"margin": 1.0, "asymmetric": False}])
def test_gradients_finite_without_rare_class(labels, kw):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 8, 8, 4, generator=gen, dtype=torch.float32, requires_grad=True)
    choice = torch.tensor(labels)[torch.randint(0, len(labels), (2, 8, 8, 4), generator=gen)]
    # Saturated logits stress the focal power and log terms.
    (10 * logits).retain_grad()
    loss = per_sample_loss(10 * logits, choice, LossConfig(kind="ce_dice", **kw), RARE).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_per_sample_reduction_is_stack_of_single_samples():
    logits = torch.randn(4, 3, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = torch.randint(0, 3, (4, 6, 5), generator=torch.Generator().manual_seed(4))
    cfg = LossConfig(kind="ce_dice", margin=0.4, focal_gamma=2.0)
    batch = per_sample_loss(logits, target, cfg, RARE)
    singles = torch.cat([per_sample_loss(logits[i : i + 1], target[i : i + 1], cfg, RARE) for i in range(4)])
    torch.testing.assert_close(batch, singles)
    assert batch.shape == (4,)


def test_deep_supervision_weights_and_loss():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    gen = torch.Generator().manual_seed(5)
    outs = [torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 4, 4, generator=gen),
            torch.randn(2, 3, 2, 2, generator=gen)]
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    cfg = LossConfig()
    got = deep_supervision_loss(outs, target, cfg, RARE)
    want = 2 / 3 * per_sample_loss(outs[0], target, cfg, RARE) + 1 / 3 * per_sample_loss(
        outs[1], target[:, ::2, ::2], cfg, RARE
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(deep_supervision_loss(outs[0], target, cfg, RARE),
                               per_sample_loss(outs[0], target, cfg, RARE))


def test_batch_loss_hand_value_and_mask():
    logits = torch.tensor(Z, dtype=torch.float64).T.reshape(1, 3, 2).repeat(2, 1, 1)
    target = torch.tensor([Y, [0, 0]])
    p = [_softmax(z) for z in Z]
    ce = (-math.log(p[0][1]) - math.log(p[1][2]) - math.log(p[0][0]) - math.log(p[1][0])) / 4

    def dice(c):
        tp = sum(p[v][c] for v in range(2) if Y[v] == c)
        psum, tsum = 2 * sum(p[v][c] for v in range(2)), sum(1 for v in range(2) if Y[v] == c)
        return (2 * tp + 1e-5) / (psum + tsum + 1e-5)

    got = batch_loss(logits, target, "ce_dice", [1, 2]).item()
    assert got == pytest.approx(ce + 1 - (dice(1) + dice(2)) / 2, rel=1e-10)
    assert batch_loss(logits, target, "ce", [1, 2]).item() == pytest.approx(ce, rel=1e-10)
    assert batch_loss(logits, target, "dice", [2]).item() == pytest.approx(1 - dice(2), rel=1e-10)
    # Masking out the second sample equals the loss of the first alone.
    mask = torch.tensor([[True, True], [False, False]])
    torch.testing.assert_close(
        batch_loss(logits, target, "ce_dice", [1, 2], mask), batch_loss(logits[:1], target[:1], "ce_dice", [1, 2])
    )


def test_soft_dice_per_class_mask_and_batch():
    probs = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]])  # (1, 2, 3)
    onehot = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])
    d = soft_dice_per_class(probs, onehot, smooth=0.0)
    torch.testing.assert_close(d, torch.tensor([[2 / 2.5, 3 / 3.5]]))
    d_masked = soft_dice_per_class(probs, onehot, torch.tensor([[True, True, False]]), smooth=0.0)
    torch.testing.assert_close(d_masked, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(soft_dice_per_class(probs.repeat(2, 1, 1), onehot.repeat(2, 1, 1), batch=True), d[0],
                               atol=1e-5, rtol=1e-5)


def test_rare_mask():
    labels = {"background": 0, "kidney": 1, "tumour": 2}
    assert rare_mask(labels, None, 3).tolist() == [False, True, True]
    assert rare_mask(labels, ["tumour"], 3).tolist() == [False, False, True]
    with pytest.raises(AugsearchError, match=r"\['tumor'\].*background.*kidney.*tumour"):
        rare_mask(labels, ["tumor"], 3)
    with pytest.raises(AugsearchError, match="num_classes"):
        rare_mask(labels, None, 2)
    with pytest.raises(AugsearchError, match="bool tensor"):
        per_sample_loss(_logits(), _target(), LossConfig(), torch.tensor([True]))
