"""Label-free Dice estimators: each formula against a hand computation, fitted parameters against planted ones."""

import numpy as np
import pytest

from augsearch.predict.estimate import ESTIMATORS, Estimator, EstimatorError, fit_estimator, soft_dice


def _two_class(p1):
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1])


def test_soft_dice_matches_hand_counts():
    q = _two_class([0.9, 0.8, 0.3, 0.1])
    pred = np.array([1, 1, 0, 0])
    # class 1: TP 0.9+0.8, FP 0.1+0.2, FN 0.3+0.1; class 0: TP 0.7+0.9, FP 0.3+0.1, FN 0.1+0.2
    np.testing.assert_allclose(soft_dice(q, pred), [3.2 / 3.9, 3.4 / 4.1])


def test_soft_dice_is_nan_for_a_class_absent_everywhere():
    q = np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    dice = soft_dice(q, np.array([0, 0]))
    assert dice[0] == 1.0 and np.isnan(dice[1]) and np.isnan(dice[2])


def test_ac_is_soft_dice_of_the_probabilities():
    p = _two_class([0.9, 0.8, 0.3, 0.1])
    np.testing.assert_allclose(Estimator("AC", 2).estimate(p), [3.2 / 3.9, 3.4 / 4.1])


def test_ts_divides_log_probabilities_by_the_temperature():
    p1 = np.array([0.9, 0.2])
    q = Estimator("TS", 2, {"temperature": [2.0, 2.0]}).calibrated(_two_class(p1))
    expected = np.sqrt(p1) / (np.sqrt(p1) + np.sqrt(1 - p1))
    np.testing.assert_allclose(q[1], expected)


def test_cs_ts_uses_the_temperature_of_the_predicted_class():
    p1 = np.array([0.9, 0.2])  # predicted 1, then 0
    q = Estimator("CS-TS", 2, {"temperature": [1.0, 2.0]}).calibrated(_two_class(p1))
    np.testing.assert_allclose(q[1], [np.sqrt(0.9) / (np.sqrt(0.9) + np.sqrt(0.1)), 0.2])


def test_vs_scales_and_shifts_log_probabilities():
    p = np.array([[0.6], [0.4]])
    q = Estimator("VS", 2, {"scale": [1.0, 2.0], "bias": [0.0, 0.5]}).calibrated(p)
    a, b = 0.6, 0.4**2 * np.exp(0.5)
    np.testing.assert_allclose(q[:, 0], [a / (a + b), b / (a + b)])


def test_doc_and_atc_fit_in_closed_form():
    p = _two_class([0.9, 0.8, 0.3, 0.1])
    y = np.array([1, 0, 0, 0])
    # prediction 1,1,0,0; confidences .9 .8 .7 .9; correct 1,0,1,1 (accuracy .75)
    assert fit_estimator("DoC", [p], [y]).params["gap"] == pytest.approx([0.075, 0.075])
    # class 0: mean confidence .8, precision 1; class 1: mean confidence .85, precision .5
    assert fit_estimator("CS-DoC", [p], [y]).params["gap"] == pytest.approx([-0.2, 0.35])
    # one voxel in four at or below the threshold: 0.7
    assert fit_estimator("ATC", [p], [y]).params["threshold"] == pytest.approx([0.7, 0.7])
    # class 0 all correct (threshold 0 keeps all), class 1 half: 0.8
    assert fit_estimator("CS-ATC", [p], [y]).params["threshold"] == pytest.approx([0.0, 0.8])


def test_doc_estimate_lowers_the_confidence_and_spreads_the_rest():
    est = Estimator("DoC", 2, {"gap": [0.075, 0.075]})
    # confidences .9, .7 become .825, .625: q1 = (.825, .375)
    np.testing.assert_allclose(est.estimate(_two_class([0.9, 0.3])), [1.25 / 1.8, 1.65 / 2.2])


def test_cs_atc_estimate_counts_voxels_above_their_class_threshold():
    est = Estimator("CS-ATC", 2, {"threshold": [0.0, 0.8]})
    # predictions 1,1,0 with confidences .85,.6,.8: correct, wrong, correct
    # class 1: TP 1, FP 1, FN 0; class 0: TP 1, FP 0, FN 1 (the wrong voxel goes to class 0)
    np.testing.assert_allclose(est.estimate(_two_class([0.85, 0.6, 0.2])), [2 / 3, 2 / 3])


def test_the_remaining_mass_goes_to_other_classes_in_proportion():
    p = np.array([[0.6], [0.3], [0.1]])
    q = Estimator("ATC", 3, {"threshold": [0.7] * 3}).calibrated(p)  # 0.6 is below: confidence 0
    np.testing.assert_allclose(q[:, 0], [0.0, 0.75, 0.25])
    q = Estimator("DoC", 3, {"gap": [0.2] * 3}).calibrated(p)
    np.testing.assert_allclose(q[:, 0], [0.4, 0.45, 0.15])


def _sample(probs, rng):
    """One label per voxel drawn from probs (N, K)."""
    return (rng.random(len(probs))[:, None] > probs.cumsum(1)).sum(1)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ts_recovers_a_planted_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(20000, 3))
    y = _sample(_softmax(z / 2.0), rng)
    est = fit_estimator("TS", [_softmax(z).T], [y])
    assert est.params["temperature"] == pytest.approx([2.0] * 3, rel=0.1)


def test_cs_ts_recovers_planted_temperatures_per_predicted_class():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, size=(30000, 3))
    planted = np.array([0.5, 1.0, 2.0])
    y = _sample(_softmax(z / planted[z.argmax(1)][:, None]), rng)
    est = fit_estimator("CS-TS", [_softmax(z).T], [y])
    assert est.params["temperature"] == pytest.approx(planted.tolist(), rel=0.15)


def test_calibrated_probabilities_give_an_unbiased_ac_estimate():
    rng = np.random.default_rng(2)
    p = _softmax(rng.normal(0, 2, size=(50000, 2)))
    y = _sample(p, rng)
    pred = p.argmax(1)
    true = [2 * ((pred == c) & (y == c)).sum() / ((pred == c).sum() + (y == c).sum()) for c in range(2)]
    np.testing.assert_allclose(Estimator("AC", 2).estimate(p.T), true, atol=0.01)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_fits_estimates_and_round_trips(name):
    rng = np.random.default_rng(3)
    p = _softmax(rng.normal(0, 2, size=(400, 3))).T.reshape(3, 20, 20)
    y = _sample(p.reshape(3, -1).T, rng).reshape(20, 20)
    est = fit_estimator(name, [p], [y])
    again = Estimator.from_dict(est.to_dict())
    dice = again.estimate(p)
    assert dice.shape == (3,) and np.all((dice >= 0) & (dice <= 1))
    np.testing.assert_allclose(dice, est.estimate(p))


def test_bad_inputs_are_refused_with_a_reason():
    p = _two_class([0.9, 0.1])
    with pytest.raises(EstimatorError, match="unknown estimator"):
        fit_estimator("XYZ", [p], [np.array([1, 0])])
    with pytest.raises(EstimatorError, match="does not match"):
        fit_estimator("TS", [p], [np.array([1, 0, 0])])
    with pytest.raises(EstimatorError, match="labels range"):
        fit_estimator("TS", [p], [np.array([1, 2])])
    with pytest.raises(EstimatorError, match="expected \\(K=3"):
        Estimator("AC", 3).estimate(p)
