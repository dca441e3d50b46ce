"""Planted-answer searches: the real `fit`, ops and policy on benchmarks with a known train/validation shift.

Each test loads its config from experiments/planted/ (settings and measured seeds: experiments/planted/README.md),
redirects data and run folders into tmp paths, and asserts thresholds that held in every seed measured there.
"""

from pathlib import Path

import pytest

from augsearch.config import load_config
from augsearch.ops.registry import list_ops
from augsearch.policy_io import load_policy
from augsearch.train import fit

PLANTED = Path(__file__).resolve().parents[1] / "experiments" / "planted"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("planted-data")


@pytest.fixture(scope="module")
def plain_flip_x(data_dir, tmp_path_factory):
    """Checkpoint of a segmenter trained without augmentation on the flip_x benchmark."""
    return _fit("plain_flip_x", data_dir / "flip_x", tmp_path_factory.mktemp("plain")).checkpoint_path


@pytest.fixture(scope="module")
def warm_flip_x(data_dir, plain_flip_x, tmp_path_factory):
    """The plain segmenter after 100 iterations under the fixed initial policy: the joint search starts here."""
    overrides = {"train.init_checkpoint": str(plain_flip_x)}
    return _fit("warm_flip_x", data_dir / "flip_x", tmp_path_factory.mktemp("warm"), **overrides).checkpoint_path


def _fit(name: str, data_root: Path, run_dir: Path, **overrides):
    cfg = load_config(PLANTED / f"{name}.toml", {"data.root": str(data_root), **overrides})
    return fit(cfg, run_dir, progress=False)


def _foreground(policy) -> int:
    return policy.group_names.index("foreground")


def test_joint_search_learns_flip_x(data_dir, warm_flip_x, tmp_path):
    result = _fit("flip_x", data_dir / "flip_x", tmp_path / "run", **{"train.init_checkpoint": str(warm_flip_x)})
    policy = load_policy(result.policy_path)
    assert set(policy.op_names) == set(list_ops(2))
    p_on = policy.p_on().detach()[_foreground(policy)]
    flip = p_on[policy.op_names.index("flip_x")]
    # Starts at 0.1. Measured after 450 iterations (README): 0.89-1.00 and first in 6 of 6 single-thread seeds, but
    # 0.70 and fourth for seed 0 with 2 threads (this config), so only what held in every run is asserted.
    assert flip > 0.6, policy.summary()
    assert int((p_on > flip).sum()) < 4, policy.summary()


def test_joint_search_learns_gamma_direction(data_dir, tmp_path):
    root = data_dir / "gamma_down"
    plain = _fit("plain_gamma_down", root, tmp_path / "plain")
    result = _fit("gamma_down", root, tmp_path / "run", **{"train.init_checkpoint": str(plain.checkpoint_path)})
    policy = load_policy(result.policy_path)
    probs = policy.tra_probs().detach()[_foreground(policy), policy.op_names.index("gamma")]
    bins = policy.op_bins[policy.op_names.index("gamma")]
    darken = sum(float(probs[i]) for i, b in enumerate(bins) if b.sign > 0)
    brighten = sum(float(probs[i]) for i, b in enumerate(bins) if b.sign < 0)
    # Each direction starts at 0.05 (three of the six "on" bins of a P(on) = 0.1 op). Measured in 8 of 8 seeds
    # (README): darkening 0.07-0.97, at least 5.2 times the brightening mass.
    assert darken > 0.05, policy.summary()
    assert darken > 3 * brighten, policy.summary()
    # Validation is not mirrored, and mirroring breaks the side cue that tells a lesion from a decoy: flip_x fell
    # from 0.1 to at most 0.024.
    flip = float(policy.p_on().detach()[_foreground(policy), policy.op_names.index("flip_x")])
    assert flip < 0.05, policy.summary()


def test_tea_only_search_ranks_an_x_mirror_first(data_dir, plain_flip_x, tmp_path):
    result = _fit("tea_flip_x", data_dir / "flip_x", tmp_path / "tea", **{"train.init_checkpoint": str(plain_flip_x)})
    policy = load_policy(result.policy_path)
    probs = policy.tea_probs().detach()
    names = policy.tea_names
    mirrors_x = {"flip_x", "rot180_xy", "flip_all"}
    # Measured after 150 iterations: an x-mirror first in 5 of 5 seeds, their mass 0.957-0.970 (README).
    assert names[int(probs.argmax())] in mirrors_x, names[int(probs.argmax())]
    assert sum(float(probs[names.index(n)]) for n in mirrors_x) > 0.9
