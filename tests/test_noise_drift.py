"""experiments/signal/noise_drift.py: the noise it feeds the TRA optimiser carries no information, and its replay of a
row's optimiser moves a policy by the rate it is given."""

import importlib.util
from pathlib import Path

import torch

from augsearch.config import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def noise_drift():
    spec = importlib.util.spec_from_file_location("noise_drift", EXPERIMENTS / "signal" / "noise_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hippocampus_row12(*overrides: str):
    """Row 12's config: class-agnostic TRA from RandAugment's marginals, N 1 M 2, 1800 meta-steps."""
    return load_config(EXPERIMENTS / "hippocampus" / "tra_agnostic.toml",
                       ['augment.policy="randaugment-marginals"', "augment.randaugment_n=1",
                        "augment.randaugment_m=2", *overrides])


def test_the_noise_lives_on_the_live_bins_and_sums_to_zero_over_each_op():
    module = noise_drift()
    policy = module.start_policy(hippocampus_row12(), LABELS)
    live = policy.tra_logits.detach() > module.DEAD_LOGIT
    assert live.any() and (~live).any()  # the start gives zero probability to the bins of other magnitudes
    grad = module.noise_gradient(live, torch.Generator().manual_seed(0))
    assert torch.all(grad[~live] == 0)
    assert torch.allclose(grad.sum(-1), torch.zeros(grad.shape[:-1]), atol=1e-5)
    assert grad[live].abs().min() > 0


def test_noise_makes_a_sparse_policy_denser_at_the_tables_rate_and_not_at_a_tiny_one():
    module = noise_drift()
    start_ops = module.start_policy(hippocampus_row12(), LABELS).p_on().sum().item()

    def mean_ops(*overrides: str) -> float:
        cfg = hippocampus_row12(*overrides)
        return sum(module.replay(cfg, LABELS, r).p_on().sum().item() for r in range(8)) / 8

    assert abs(start_ops - 1.0) < 1e-3  # one op a patch: RandAugment's N = 1
    assert mean_ops() > start_ops + 0.3
    assert abs(mean_ops("augment.tra.lr=1e-6") - start_ops) < 1e-3
