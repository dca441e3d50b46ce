"""Shared policy: the server's arithmetic, the in-process server inside `fit`, accumulation, sharding, restarts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.config import AugmentConfig, TrainConfig, load_config
from augsearch.learn.server import (
    STATE_NAME,
    Contribution,
    InProcessPolicyServer,
    PolicyServerError,
    PolicyServerState,
    _Rounds,
    worker_shard,
)
from augsearch.policy.io import load_policy
from augsearch.train import _build_policy, fit

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "smoke2d"


def smoke(data_root: Path, **overrides):
    sets = {"train.epochs": 2, "train.iterations": 2, "data.root": str(data_root), "train.num_threads": 1, **overrides}
    return load_config(SMOKE, sets)


def policy_logits(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    policy = load_policy(run_dir / "policy.json")
    return policy.tra_logits.detach(), policy.tea_logits.detach()


def test_one_worker_on_the_server_equals_the_independent_search_bit_for_bit(data_root, tmp_path):
    cfg = smoke(data_root)
    alone = fit(cfg, tmp_path / "alone", progress=False)
    shared_cfg = smoke(data_root, **{"search.policy_sharing": "shared"})
    server = InProcessPolicyServer(shared_cfg.augment, shared_cfg.train, tmp_path / "server" / STATE_NAME)
    shared = fit(shared_cfg, tmp_path / "shared", progress=False, policy_server=server)
    tra_a, tea_a = policy_logits(alone.run_dir)
    tra_s, tea_s = policy_logits(shared.run_dir)
    assert torch.equal(tra_a, tra_s) and torch.equal(tea_a, tea_s)
    assert torch.equal(server.state.tra_logits.detach(), tra_s)
    assert server.state.round == 4  # 2 epochs x 2 iterations, one policy step each
    # the policy moved, so the equality compares two trajectories, not two unchanged starts
    start = _build_policy(cfg, load_checkpoint(alone.checkpoint_path)["label_names"])
    assert not torch.equal(start.tra_logits.detach(), tra_a) and not torch.equal(start.tea_logits.detach(), tea_a)
    assert alone.metrics["val/dice_rare"] == shared.metrics["val/dice_rare"]
    # the server checkpointed with the validations
    saved = torch.load(tmp_path / "server" / STATE_NAME, weights_only=False)
    assert saved["round"] == 4 and torch.equal(saved["tra_logits"], tra_s)


def test_server_state_averages_contributions_and_resumes_from_its_file(tmp_path):
    augment, train = AugmentConfig(), TrainConfig(epochs=2)
    tra, tea = torch.zeros(2, 3, 4), torch.zeros(5)
    state = PolicyServerState(augment, train, tra, tea)
    g1, g2 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    state.apply([Contribution(0, 0, g1, None), Contribution(1, 0, g2, torch.ones(5))])
    reference = PolicyServerState(augment, train, tra, tea)
    reference.apply([Contribution(0, 0, (g1 + g2) / 2, torch.ones(5))])
    assert torch.allclose(state.tra_logits, reference.tra_logits) and torch.equal(state.tea_logits, reference.tea_logits)
    assert not torch.equal(state.tra_logits, tra)
    state.save(tmp_path / STATE_NAME)
    restarted = PolicyServerState.load(tmp_path / STATE_NAME, augment, train)
    g3 = torch.randn(2, 3, 4)
    for s in (state, restarted):
        s.apply([Contribution(0, 1, g3, None)])
    assert torch.equal(state.tra_logits, restarted.tra_logits) and restarted.round == 2
    with pytest.raises(PolicyServerError, match="shape"):
        state.apply([Contribution(0, 1, torch.zeros(3), None)])


def test_rounds_wait_for_every_live_worker_and_drop_an_absent_one_after_the_timeout(tmp_path):
    async def scenario():
        rounds = _Rounds(AugmentConfig(), TrainConfig(), tmp_path / STATE_NAME, num_workers=2, timeout_s=0.3)
        rounds.join(0, torch.zeros(1, 1, 2), torch.zeros(2))
        grad = torch.ones(1, 1, 2)
        both = await asyncio.gather(rounds.push(Contribution(0, 0, grad, None)),
                                    rounds.push(Contribution(1, 0, -grad, None)))
        assert [s.round for s in both] == [1, 1] and rounds.timeouts == 0
        alone = await rounds.push(Contribution(0, 0, grad, None))  # worker 1 died: one timeout, then no waiting
        assert alone.round == 2 and rounds.timeouts == 1 and rounds.state.live == {0}
        again = await rounds.push(Contribution(0, 0, grad, None))
        assert again.round == 3 and rounds.timeouts == 1
        back = await asyncio.gather(rounds.push(Contribution(1, 0, grad, None)),  # worker 1 rejoins
                                    rounds.push(Contribution(0, 0, grad, None)))
        assert [s.round for s in back] == [4, 4] and rounds.state.contributions == 1 * 2 + 1 + 1 + 2

    asyncio.run(scenario())


def test_accumulate_steps_once_per_k_meta_iterations(data_root, tmp_path):
    cfg = smoke(data_root, **{"search.policy_sharing": "shared", "augment.accumulate": 2})
    server = InProcessPolicyServer(cfg.augment, cfg.train, tmp_path / STATE_NAME)
    fit(cfg, tmp_path / "run", progress=False, policy_server=server)
    assert server.state.round == 2  # 4 meta-iterations, averaged in pairs


def test_workers_train_on_disjoint_shards(data_root, tmp_path):
    cases = list(range(7))
    shards = [worker_shard(cases, w, 3) for w in range(3)]
    assert sorted(sum(shards, [])) == cases and shards[0] == [0, 3, 6]
    assert worker_shard(cases, 0, 1) == cases
    with pytest.raises(PolicyServerError, match="num_workers"):
        worker_shard(cases[:2], 0, 3)
    cfg = smoke(data_root, **{"search.policy_sharing": "shared", "search.num_workers": 2, "search.worker": 1})
    result = fit(cfg, tmp_path / "w1", progress=False)
    trained = json.loads((result.run_dir / "policy.json").read_text())["provenance"]["train_cases"]
    assert len(trained) == 2  # the smoke benchmark's 4 training cases, every second from position 1
