import math
from dataclasses import dataclass

import pytest
import torch

from augsearch.policy.core import ZERO_LOGIT, Policy, PolicyError, magnitude_levels
from augsearch.policy.groups import resolve_groups
from augsearch.policy.gumbel import conditional_gumbel, gumbel_max, score_function, straight_through

EULER = 0.5772156649015329


@dataclass(frozen=True)
class Bin:
    label: str
    low: float
    high: float
    sign: int


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str
    bins: tuple


@dataclass(frozen=True)
class Entry:
    id: int
    name: str
    op: str
    value: float | None
    spatial: bool


OFF = Bin("off", 0.0, 0.0, 0)
FLIP = Spec("flip_x", "spatial", (OFF, Bin("on", 1, 1, 0)))
ROT = Spec(
    "rotate_xy",
    "spatial",
    (OFF, Bin("+5", 0, 10, 1), Bin("-5", 0, 10, -1), Bin("+15", 10, 20, 1), Bin("-15", 10, 20, -1),
     Bin("rot90+", 90, 90, 1), Bin("rot90-", 90, 90, -1)),
)
NOISE = Spec("noise", "intensity",
             (OFF, Bin("0.025", 0, 0.05, 0), Bin("0.075", 0.05, 0.1, 0), Bin("0.125", 0.1, 0.15, 0)))
SPECS = (FLIP, ROT, NOISE)
POOL = (
    Entry(0, "identity", "identity", None, False),
    Entry(1, "flip_x", "flip_x", None, True),
    Entry(2, "rotate_xy_180", "rotate_xy", 180.0, True),
    Entry(3, "gamma+0.3", "gamma", 0.3, False),
)
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _policy(seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    args = dict(
        dims=2,
        op_specs=SPECS,
        group_labels={"background": [0], "foreground": [1, 2]},
        label_names=LABELS,
        tea_entries=POOL,
        tra_logits=torch.randn(2, 3, 7, generator=gen),
        tea_logits=torch.randn(4, generator=gen),
        tea_top_k=2,
    )
    args.update(kw)
    return Policy(**args)


def _no_rot90():
    available = torch.ones(3, 7, dtype=torch.bool)
    available[1, 5:] = False  # rot90 bins of rotate_xy
    return available


def test_probs_zero_at_padded_and_unavailable_bins_and_sum_to_one():
    policy = _policy(available=_no_rot90())
    probs = policy.tra_probs().detach()
    assert torch.all(probs[:, 0, 2:] == 0) and torch.all(probs[:, 2, 4:] == 0) and torch.all(probs[:, 1, 5:] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    # Available bins: softmax of their logits alone.
    row = policy.tra_logits.detach()[1, 1, :5]
    torch.testing.assert_close(probs[1, 1, :5], torch.softmax(row, 0))


def test_sampling_frequencies_match_probabilities_and_skip_unavailable_bins():
    policy = _policy(available=_no_rot90())
    n = 40000
    groups = torch.tensor([0, 1]).repeat_interleave(n)
    bins = policy.sample_tra(groups, torch.Generator().manual_seed(1))
    assert bins.shape == (2 * n, 3) and bins.dtype == torch.int64
    probs = policy.tra_probs().detach().double()
    for g in range(2):
        chosen = bins[groups == g]
        for k, size in enumerate((2, 7, 4)):
            freq = torch.bincount(chosen[:, k], minlength=7).double() / n
            assert torch.all(freq[size:] == 0)  # padded bins never drawn
            p = probs[g, k]
            sigma = torch.sqrt(p * (1 - p) / n)
            assert torch.all((freq - p).abs() <= 5 * sigma + 1e-9), (g, k, freq, p)
    assert not torch.any(bins[:, 1] >= 5)  # rot90 unavailable: never drawn


def test_sampling_is_reproducible_with_a_seeded_generator():
    policy = _policy()
    groups = torch.tensor([0, 1, 1, 0, 1])
    a = policy.sample_tra(groups, torch.Generator().manual_seed(7))
    b = policy.sample_tra(groups, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_group_index_uses_the_anchor_class():
    policy = _policy(group_labels={"background": [0], "organ": [1], "lesion": [2]}, tra_logits=torch.zeros(3, 3, 7))
    assert policy.group_index(torch.tensor([2, 0, 1, 1, 0])).tolist() == [2, 0, 1, 1, 0]
    fg = _policy()
    assert fg.group_index(torch.tensor([2, 0, 1])).tolist() == [1, 0, 1]
    with pytest.raises(PolicyError, match=r"anchor classes \[3, 7\]"):
        fg.group_index(torch.tensor([0, 3, 7]))


def test_per_group_sampling_follows_each_groups_categorical():
    logits = torch.full((2, 3, 7), ZERO_LOGIT)
    logits[:, :, 0] = 0.0
    logits[1, 0, 0], logits[1, 0, 1] = ZERO_LOGIT, 0.0  # foreground always flips, background never
    policy = _policy(tra_logits=logits)
    anchors = torch.tensor([0, 1, 2, 0, 2] * 200)
    bins = policy.sample_tra(policy.group_index(anchors), torch.Generator().manual_seed(0))
    assert torch.equal(bins[:, 0], (anchors != 0).long())
    assert torch.all(bins[:, 1:] == 0)


def test_groups_must_cover_every_label_exactly_once():
    with pytest.raises(PolicyError, match="lesion.*belong to no group"):
        resolve_groups(LABELS, {"background": ["background"], "organ": ["organ"]}, class_specific=True)
    with pytest.raises(PolicyError, match="'organ' is in both groups"):
        resolve_groups(LABELS, {"a": ["background", "organ"], "b": ["organ", "lesion"]}, class_specific=True)
    with pytest.raises(PolicyError, match="names label 'liver'"):
        resolve_groups(LABELS, {"a": ["liver"]}, class_specific=True)
    assert resolve_groups(LABELS, None, class_specific=True) == {"background": (0,), "foreground": (1, 2)}
    assert resolve_groups(LABELS, None, class_specific=False) == {"all": (0, 1, 2)}
    user = {"background": ["background"], "organ": ["organ"], "lesion": ["lesion"]}
    assert resolve_groups(LABELS, user, class_specific=True) == {"background": (0,), "organ": (1,), "lesion": (2,)}
    with pytest.raises(PolicyError, match="belong to no group"):
        _policy(group_labels={"background": [0], "foreground": [1]})


def test_straight_through_weight_is_exactly_one_with_the_analytic_gradient():
    for tau in (1.0, 0.5):
        policy = _policy(available=_no_rot90(), tau=tau)
        groups = torch.tensor([1, 0, 1, 1])
        bins = policy.sample_tra(groups, torch.Generator().manual_seed(3))
        weights = policy.tra_weights(groups, bins, torch.Generator().manual_seed(4))
        assert weights.shape == (4, 3) and torch.all(weights == 1.0)  # exactly, not approximately
        # The same conditional draw, recomputed: the gradient must be d softmax((phi+G)/tau)_a / d phi.
        phi = policy.masked_tra_logits().detach()[groups]
        perturbed = conditional_gumbel(phi, bins, torch.Generator().manual_seed(4))
        for i in range(4):
            for k in range(3):
                policy.tra_logits.grad = None
                policy.tra_weights(groups, bins, torch.Generator().manual_seed(4))[i, k].backward()
                grad = policy.tra_logits.grad
                y = torch.softmax(perturbed[i, k] / tau, 0)
                a = int(bins[i, k])
                expected = y[a] * ((torch.arange(7) == a).float() - y) / tau
                torch.testing.assert_close(grad[groups[i], k], expected, rtol=1e-5, atol=1e-7)
                # Only that group's row of that op receives a gradient.
                others = grad.clone()
                others[groups[i], k] = 0
                assert torch.all(others == 0)
                assert torch.all(grad[groups[i], k][~policy.available[k]] == 0)
                assert grad[groups[i], k].abs().sum() > 0


def test_reinforce_weight_is_exactly_one_with_the_score_as_gradient():
    policy = _policy(available=_no_rot90())
    groups = torch.tensor([1, 0, 1])
    bins = policy.sample_tra(groups, torch.Generator().manual_seed(3))
    weights = policy.tra_weights(groups, bins, None, estimator="reinforce")
    assert weights.shape == (3, 3) and torch.all(weights == 1.0)
    probs = policy.tra_probs().detach()
    for i in range(3):
        for k in range(3):
            policy.tra_logits.grad = None
            policy.tra_weights(groups, bins, None, estimator="reinforce")[i, k].backward()
            expected = torch.zeros(2, 3, 7)  # d log p_a / d phi = onehot(a) - p, in that group's row of that op only
            expected[groups[i], k] = (torch.arange(7) == bins[i, k]).float() - probs[groups[i], k]
            torch.testing.assert_close(policy.tra_logits.grad, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(PolicyError, match="estimator"):
        policy.tra_weights(groups, bins, None, estimator="gumbel")


def test_reinforce_estimates_the_expected_gradient_without_bias():
    """d E_{a ~ softmax(phi)}[f(a)] / d phi = p * (f - E f): the mean over draws of sum_i f(a_i) d w_i / d phi must
    match it within its standard error with score-function weights; the straight-through weights miss it."""
    phi = torch.tensor([0.5, -0.3, 1.0, -math.inf], dtype=torch.float64)
    f = torch.tensor([1.0, -2.0, 0.5, 7.0], dtype=torch.float64)  # the value of the unavailable category never counts
    p = torch.softmax(phi, 0)
    exact = torch.where(torch.isfinite(phi), p * (f - (p[:3] * f[:3]).sum()), torch.zeros_like(p))
    generator = torch.Generator().manual_seed(0)
    chunks, size = 50, 400

    def estimates(weights_of) -> torch.Tensor:
        """(chunks, K): the estimator's mean over each chunk of independent draws."""
        out = []
        for _ in range(chunks):
            logits = phi.clone().requires_grad_(True)
            drawn = gumbel_max(phi.expand(size, -1), generator)
            (grad,) = torch.autograd.grad(weights_of(logits.expand(size, -1), drawn), logits, grad_outputs=f[drawn])
            out.append(grad / size)
        return torch.stack(out)

    reinforce = estimates(score_function)
    error = reinforce.std(0) / math.sqrt(chunks)
    assert torch.all((reinforce.mean(0) - exact).abs()[:3] < 4.5 * error[:3])
    assert torch.all(reinforce[:, 3] == 0)
    straight = estimates(lambda logits, drawn: straight_through(
        logits, conditional_gumbel(logits.detach(), drawn, generator), drawn, 1.0))
    assert (straight.mean(0) - exact).abs()[0] > 10 * straight.std(0)[0] / math.sqrt(chunks)


def test_weight_gradient_reaches_the_chosen_bin_positively():
    policy = _policy()
    groups = torch.zeros(64, dtype=torch.long)
    bins = policy.sample_tra(groups, torch.Generator().manual_seed(0))
    policy.tra_weights(groups, bins, torch.Generator().manual_seed(1))[:, 2].sum().backward()
    grad = policy.tra_logits.grad[0, 2]
    counts = torch.bincount(bins[:, 2], minlength=7)
    # d y_a / d phi_a = y_a (1 - y_a) / tau > 0: chosen-only bins gain, never-chosen bins lose.
    for b in range(4):
        if counts[b] == 0:
            assert grad[b] < 0
    assert torch.all(grad[4:] == 0)
    assert abs(float(grad.sum())) < 1e-5  # softmax gradients sum to zero over a row


def test_conditional_gumbel_argmax_is_the_given_index_even_for_rare_bins():
    logits = torch.tensor([[4.0, 0.0, -6.0, -math.inf, 1.0]]).expand(5000, -1)
    index = torch.randint(0, 5, (5000,), generator=torch.Generator().manual_seed(0))
    index[index == 3] = 2  # category 3 is unavailable
    perturbed = conditional_gumbel(logits, index, torch.Generator().manual_seed(1))
    assert torch.equal(perturbed.argmax(-1), index)
    assert torch.all(perturbed[:, 3] == -math.inf)
    assert torch.all(torch.isfinite(perturbed[:, [0, 1, 2, 4]]))


def test_conditional_gumbel_is_exact_in_distribution():
    phi = torch.tensor([1.5, 0.0, -1.0, 0.5], dtype=torch.float64)
    n = 200000
    gen = torch.Generator().manual_seed(2)
    index = gumbel_max(phi.expand(n, -1), gen)
    perturbed = conditional_gumbel(phi.expand(n, -1), index, gen)
    top = perturbed.max(-1).values
    # The maximum is Gumbel(logsumexp(phi)): mean lse + Euler's constant, variance pi^2 / 6.
    lse = float(torch.logsumexp(phi, 0))
    assert abs(float(top.mean()) - (lse + EULER)) < 0.02
    assert abs(float(top.var()) - math.pi**2 / 6) < 0.03
    # With the index drawn from the categorical, every coordinate is marginally Gumbel(phi_j).
    for j in range(4):
        assert abs(float(perturbed[:, j].mean()) - (float(phi[j]) + EULER)) < 0.02
        assert abs(float(perturbed[:, j].var()) - math.pi**2 / 6) < 0.04
    # And G = perturbed - phi is independent of phi's identity: the same for a shifted phi.
    shifted = conditional_gumbel((phi + 3).expand(n, -1), index, torch.Generator().manual_seed(5))
    assert abs(float(shifted[:, 0].mean()) - (float(phi[0]) + 3 + EULER)) < 0.03


def test_straight_through_function_value_and_masked_gradient():
    phi = torch.tensor([[0.3, -0.2, -math.inf]], requires_grad=True)
    perturbed = torch.tensor([[2.0, 1.0, -math.inf]])
    w = straight_through(phi, perturbed, torch.tensor([0]), 1.0)
    assert w.item() == 1.0
    w.sum().backward()
    y = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    torch.testing.assert_close(phi.grad[0, :2], torch.stack([y[0] * (1 - y[0]), -y[0] * y[1]]))
    assert phi.grad[0, 2] == 0


def test_tea_sampling_weights_and_selection():
    policy = _policy(tea_logits=torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])), tea_top_k=3)
    ids = policy.sample_tea(40000, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).double() / 40000
    assert torch.all((freq - torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)).abs() < 0.012)
    weights = policy.tea_weights(ids[:16], torch.Generator().manual_seed(1))
    assert torch.all(weights == 1.0)
    weights.sum().backward()
    assert policy.tea_logits.grad.abs().sum() > 0
    selected = policy.tea_selected()
    assert [i for i, _ in selected] == [0, 1, 2]
    assert [round(w, 6) for _, w in selected] == [round(0.4 / 0.9, 6), round(0.3 / 0.9, 6), round(0.2 / 0.9, 6)]
    assert abs(sum(w for _, w in policy.tea_selected(2)) - 1.0) < 1e-12
    tie = _policy(tea_logits=torch.zeros(4), tea_top_k=1)
    assert tie.tea_selected() == [(0, 1.0)]  # ties go to the lower id: identity
    unavailable = _policy(tea_logits=torch.zeros(4), tea_available=torch.tensor([True, False, True, True]))
    assert 1 not in unavailable.sample_tea(2000, torch.Generator().manual_seed(0)).tolist()
    assert [i for i, _ in unavailable.tea_selected(3)] == [0, 2, 3]


def test_magnitude_levels_group_signed_bins_by_band():
    assert magnitude_levels(ROT.bins, [True] * 7) == [[1, 2], [3, 4], [5, 6]]
    assert magnitude_levels(ROT.bins, [True] * 5 + [False] * 2) == [[1, 2], [3, 4]]
    assert magnitude_levels(FLIP.bins, [True, True]) == [[1]]


def test_randaugment_picks_n_ops_at_magnitude_m():
    policy = _policy(sampling="randaugment", randaugment_n=2, randaugment_m=2)
    n = 30000
    bins = policy.sample_tra(torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(0))
    on = bins != 0
    assert torch.all(on.sum(1) == 2)
    torch.testing.assert_close(on.double().mean(0), torch.full((3,), 2 / 3, dtype=torch.float64), atol=0.015, rtol=0)
    # flip_x has one level: m=2 clamps to it. rotate_xy level 2 = +/-15 degrees, noise level 2 = 0.075.
    assert set(bins[on[:, 0], 0].tolist()) == {1}
    rot = bins[on[:, 1], 1]
    assert set(rot.tolist()) == {3, 4} and abs(float((rot == 3).double().mean()) - 0.5) < 0.02
    assert set(bins[on[:, 2], 2].tolist()) == {2}
    marginals = policy.baseline_marginals()
    torch.testing.assert_close(marginals[1], torch.tensor([1 / 3, 0, 0, 1 / 3, 1 / 3, 0, 0], dtype=torch.float64))
    strongest = _policy(sampling="randaugment", randaugment_n=5, randaugment_m=9, available=_no_rot90())
    bins = strongest.sample_tra(torch.zeros(500, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.all((bins != 0).sum(1) == 3)  # n capped at the number of ops
    assert set(bins[:, 1].tolist()) == {3, 4}  # rot90 unavailable: strongest level left is +/-15


def test_trivialaugment_picks_one_op_and_one_non_off_bin_uniformly():
    policy = _policy(sampling="trivialaugment", available=_no_rot90())
    n = 36000
    bins = policy.sample_tra(torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(0))
    on = bins != 0
    assert torch.all(on.sum(1) == 1)
    torch.testing.assert_close(on.double().mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.012, rtol=0)
    rot = torch.bincount(bins[on[:, 1], 1], minlength=7).double()
    assert rot[5:].sum() == 0
    torch.testing.assert_close(rot[1:5] / rot.sum(), torch.full((4,), 0.25, dtype=torch.float64), atol=0.02, rtol=0)


def test_none_sampling_is_always_off():
    policy = _policy(sampling="none")
    assert torch.all(policy.sample_tra(torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0)) == 0)


def test_summary_lists_top_ops_per_group():
    logits = torch.full((2, 3, 7), ZERO_LOGIT)
    logits[:, :, 0] = 0.0
    logits[1, 1, 0], logits[1, 1, 1] = math.log(0.69), math.log(0.31)
    logits[0, 0, 0], logits[0, 0, 1] = math.log(0.5), math.log(0.5)
    policy = _policy(tra_logits=logits, tea_logits=torch.log(torch.tensor([0.5, 0.3, 0.1, 0.1])))
    assert policy.summary(top=2) == (
        "Policy(background: flip_x .50, rotate_xy .00 ... | foreground: rotate_xy .31, flip_x .00 ... "
        "| tea: identity .50, flip_x .30 ...)"
    )


def test_bad_construction_is_rejected_with_a_message():
    with pytest.raises(PolicyError, match="dims must be 2 or 3"):
        _policy(dims=4)
    with pytest.raises(PolicyError, match="tra_logits must have shape"):
        _policy(tra_logits=torch.zeros(2, 3, 5))
    with pytest.raises(PolicyError, match="sampling must be one of"):
        _policy(sampling="auto")
    with pytest.raises(PolicyError, match="must index available"):
        _policy(available=_no_rot90()).tra_weights(torch.tensor([0]), torch.tensor([[0, 5, 0]]), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_and_weights_follow_the_device():
    policy = _policy(available=_no_rot90()).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    groups = policy.group_index(torch.tensor([0, 1, 2, 1], device="cuda"))
    bins = policy.sample_tra(groups, gen)
    assert bins.device.type == "cuda" and not torch.any(bins[:, 1] >= 5)
    weights = policy.tra_weights(groups, bins, gen)
    assert torch.all(weights == 1.0)
    weights.sum().backward()
    assert policy.tra_logits.grad.device.type == "cuda" and policy.tra_logits.grad.abs().sum() > 0
    ids = policy.sample_tea(8, gen)
    assert torch.all(policy.tea_weights(ids, gen) == 1.0)
    ra = policy.replace(sampling="randaugment").to("cuda")
    assert torch.all((ra.sample_tra(groups, gen) != 0).sum(1) == 2)
