"""The reference package `moval` (Li et al., MICCAI 2022; PyPI moval==0.3.25) on the same probabilities as ours.

An experiment-only requirement, installed without its dependency list so it cannot pull torch:
`pip install --no-deps moval==0.3.25 scikit-learn` (moval imports scikit-learn and scipy; nothing else it lists is
used). moval takes logits; log p is passed, whose softmax is p again. Each estimator is a `moval.MOVAL` in
segmentation mode with metric "f1score" (Dice) and max-class-probability confidences, fitted on the validation cases
by its own scipy solver, and applied to one case at a time so its estimate is that case's Dice per class.

Compatibility: moval 0.3.25's solver stores scipy's length-1 parameter array into one element of its class-specific
parameter vector, which NumPy 2 refuses ("setting an array element with a sequence"; deprecated since NumPy 1.25).
`_numpy2_compatible` hands the solver the scalar instead; nothing else of moval is changed.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

# our estimator name -> (moval estim_algorithm, class_specific); VS has no moval counterpart.
MOVAL_ESTIMATORS = {
    "AC": ("ac-model", False), "TS": ("ts-model", False), "DoC": ("doc-model", False), "ATC": ("atc-model", False),
    "TS-ATC": ("ts-atc-model", False), "CS-TS": ("ts-model", True), "CS-DoC": ("doc-model", True),
    "CS-ATC": ("atc-model", True), "CS-TS-ATC": ("ts-atc-model", True),
}


def _logits(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, 1e-12))


class MovalEstimator:
    """A fitted moval model with the .estimate(p (K, *S)) -> Dice per class (K,) interface of ours."""

    def __init__(self, fitted) -> None:
        self.fitted = fitted

    def estimate(self, p: np.ndarray) -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()):  # moval prints its progress
            return np.asarray(self.fitted.estimate([_logits(p)]), dtype=np.float64)


def _numpy2_compatible(moval) -> None:
    """Let moval's class-specific solver assign a scalar (see the module docstring); idempotent."""
    solver = moval.solvers.solver.Solver
    if getattr(solver, "_scalar_params", False):
        return
    for attribute in ("eval_func", "eval_func_ext"):
        original = getattr(solver, attribute)

        def scalar_first(self, x, _original=original):
            return _original(self, np.ravel(x)[0] if self.class_specific else x)

        setattr(solver, attribute, scalar_first)
    solver._scalar_params = True


def fit_moval(name: str, probs: list[np.ndarray], labels: list[np.ndarray]) -> MovalEstimator:
    """moval's counterpart of estimator `name`, fitted on probabilities (K, *S) and integer labels (*S)."""
    import moval

    _numpy2_compatible(moval)
    algorithm, class_specific = MOVAL_ESTIMATORS[name]
    model = moval.MOVAL(mode="segmentation", metric="f1score", confidence_scores="max_class_probability-conf",
                        estim_algorithm=algorithm, class_specific=class_specific)
    with contextlib.redirect_stdout(io.StringIO()):
        model.fit([_logits(p) for p in probs], [np.asarray(y).astype(np.int64) for y in labels])
    return MovalEstimator(model)


def moval_parameters(estimator: MovalEstimator) -> dict[str, list[float]]:
    """The fitted parameters (temperature, 1 - gap, threshold as moval stores them) for the results file."""
    model = estimator.fitted.model_
    params = {"param": [float(x) for x in np.ravel(model.param)]}
    if model.extend_param:
        params["param_ext"] = [float(x) for x in np.ravel(model.param_ext)]
    return params
