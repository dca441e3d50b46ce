"""Shared policy: the server's arithmetic, the in-process server inside `fit`, accumulation, sharding, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from smoke import SMOKE, set_args

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.cli import main
from augsearch.config import AugmentConfig, TrainConfig, load_config
from augsearch.learn.server import (
    STATE_NAME,
    Contribution,
    InProcessPolicyServer,
    PolicyServerError,
    PolicyServerState,
    _Rounds,
    actor_name,
    state_path,
    worker_shard,
)
from augsearch.policy.io import load_policy
from augsearch.train import _build_policy, fit
from augsearch.tune.trial import CRASH_ENV


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
    start = _build_policy(cfg, load_checkpoint(alone.checkpoint_path).label_names, (1.0, 1.0),  # the smoke grid
                          log=lambda message: None)
    assert not torch.equal(start.tra_logits.detach(), tra_a) and not torch.equal(start.tea_logits.detach(), tea_a)
    assert alone.metrics["val/dice_rare"] == shared.metrics["val/dice_rare"]
    # the server checkpointed with the validations
    saved = torch.load(tmp_path / "server" / STATE_NAME, weights_only=True)
    assert saved["round"] == 4 and torch.equal(saved["tra_logits"], tra_s)


def test_tra_beta1_reaches_the_search_and_the_server_alike(data_root, tmp_path):
    momentum = {"augment.tra.beta1": 0.99}
    alone = fit(smoke(data_root, **momentum), tmp_path / "alone", progress=False)
    default = fit(smoke(data_root), tmp_path / "default", progress=False)
    shared_cfg = smoke(data_root, **momentum, **{"search.policy_sharing": "shared"})
    server = InProcessPolicyServer(shared_cfg.augment, shared_cfg.train, tmp_path / "server" / STATE_NAME)
    shared = fit(shared_cfg, tmp_path / "shared", progress=False, policy_server=server)
    assert server.state.tra_optimizer.param_groups[0]["betas"] == (0.99, 0.999)
    assert torch.equal(policy_logits(alone.run_dir)[0], policy_logits(shared.run_dir)[0])
    assert not torch.equal(policy_logits(alone.run_dir)[0], policy_logits(default.run_dir)[0])


def test_server_state_averages_contributions_and_resumes_from_its_file(tmp_path):
    augment, train = AugmentConfig(), TrainConfig(epochs=2)
    tra, tea = torch.zeros(2, 3, 4), torch.zeros(5)
    state = PolicyServerState(augment, train, tra, tea)
    g1, g2 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    state.apply([Contribution(0, 0, g1, None), Contribution(1, 0, g2, torch.ones(5))])
    reference = PolicyServerState(augment, train, tra, tea)
    reference.apply([Contribution(0, 0, (g1 + g2) / 2, torch.ones(5))])
    assert torch.allclose(state.tra_logits, reference.tra_logits)
    assert torch.equal(state.tea_logits, reference.tea_logits)
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
    every = fit(cfg.model_copy(update={"search": cfg.search.model_copy(update={"shard": "all"})}), tmp_path / "all",
                progress=False)
    assert len(json.loads((every.run_dir / "policy.json").read_text())["provenance"]["train_cases"]) == 4


# ------------------------------------------------------------------------------------------- shared searches


def shared_args(data_root: Path, *extra: str) -> list[str]:
    sets = ["train.epochs=2", "train.iterations=2", f"data.root={json.dumps(str(data_root))}", "search.space={}",
            "search.policy_sharing=shared", "search.sync_timeout_s=60", *extra]
    return set_args(sets)


def rows(run_dir: Path) -> dict[str, dict]:
    return {row["trial"]: row for row in json.loads((run_dir / "summary.json").read_text())["trials"]}


def test_interrupted_shared_search_resumes_to_the_uninterrupted_policy(data_root, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert main(["search", str(SMOKE), "--no-ray", "--out", str(whole), *shared_args(data_root)]) == 0
    monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed"))
    cut = tmp_path / "cut"
    args = shared_args(data_root, "search.max_failures=0")
    assert main(["search", str(SMOKE), "--no-ray", "--out", str(cut), *args]) == 1
    assert torch.load(cut / STATE_NAME, weights_only=True)["round"] == 2  # saved with the epoch-1 validation
    monkeypatch.delenv(CRASH_ENV)
    assert main(["search", "--resume", str(cut)]) == 0
    (row,) = rows(cut).values()
    assert row["status"] == "TERMINATED" and row["metrics"]["resumed_epoch"] == 1
    fit_dirs = [run / "trial_00000" / "fit" for run in (whole, cut)]
    (tra_w, tea_w), (tra_c, tea_c) = (policy_logits(d) for d in fit_dirs)
    assert torch.equal(tra_w, tra_c) and torch.equal(tea_w, tea_c)
    assert torch.load(cut / STATE_NAME, weights_only=True)["round"] == 4


def test_shared_search_refuses_drawn_keys_a_scheduler_and_several_workers_without_ray(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    refused = {"search.num_workers=2": "side by side on Ray",
               'search.space={"augment.tra.lr" = {loguniform = [0.01, 0.1]}}': "draws augment.tra.lr at random",
               "search.scheduler=asha": "needs scheduler='none'"}
    for override, message in refused.items():
        assert main(["search", str(SMOKE), "--no-ray", "--out", str(out), *shared_args(data_root, override)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_shared_search_over_a_grid_learns_one_policy_per_point(data_root, tmp_path):
    starts = ["uniform-0.1", "nnunet"]
    out = tmp_path / "grid"
    args = shared_args(data_root, f'search.space={{"augment.policy" = {json.dumps(starts)}}}')
    assert main(["search", str(SMOKE), "--no-ray", "--out", str(out), *args]) == 0
    found = [row for _, row in sorted(rows(out).items())]
    assert [row["params"] for row in found] == [
        {"search.group": g, "search.worker": 0, "augment.policy": start} for g, start in enumerate(starts)]
    for group, start in enumerate(starts):
        # each group is the shared search of its point alone: its own server, nothing from the other group
        alone = tmp_path / f"alone{group}"
        args = shared_args(data_root, f"augment.policy={start}")
        assert main(["search", str(SMOKE), "--no-ray", "--out", str(alone), *args]) == 0
        tra, tea = policy_logits(out / found[group]["trial"] / "fit")
        alone_tra, alone_tea = policy_logits(alone / "trial_00000" / "fit")
        assert torch.equal(tra, alone_tra) and torch.equal(tea, alone_tea)
        assert torch.equal(torch.load(state_path(out, group), weights_only=True)["tra_logits"], tra)
    assert state_path(out, 0) != state_path(out, 1)


@pytest.mark.parametrize("workers", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_workers_share_one_policy_on_ray(local_ray, data_root, tmp_path, workers):
    out = tmp_path / "search"
    # the local Ray has 2 CPUs: every worker runs at once, as a shared search needs
    args = shared_args(data_root, f"search.num_workers={workers}", f"search.cpus_per_trial={2 / workers}")
    assert main(["search", str(SMOKE), "--out", str(out), *args]) == 0
    found = rows(out)
    assert sorted(r["params"]["search.worker"] for r in found.values()) == list(range(workers))
    assert all(r["status"] == "TERMINATED" and r["metrics"]["epoch"] == 2 for r in found.values())
    fits = [out / trial / "fit" for trial in sorted(found)]
    seeds = sorted(json.loads((d / "config.json").read_text())["seed"] for d in fits)
    assert seeds == [1000 * w for w in range(workers)]  # neighbouring base seeds share no worker seed
    shards = [set(json.loads((d / "policy.json").read_text())["provenance"]["train_cases"]) for d in fits]
    assert sum(map(len, shards)) == len(set().union(*shards)) == 4  # disjoint, and every training case
    logits = [policy_logits(d) for d in fits]
    for tra, tea in logits[1:]:  # the last round's snapshot, the same for every worker
        assert torch.equal(tra, logits[0][0]) and torch.equal(tea, logits[0][1])
    state = torch.load(out / STATE_NAME, weights_only=True)
    # every worker pushed at every one of the 2 x 2 meta-iterations, and no round closed without one of them
    assert state["contributions"] == 4 * workers and state["round"] == 4
    assert torch.equal(state["tra_logits"], logits[0][0])


def test_shared_search_refuses_more_workers_than_the_cluster_runs_at_once(local_ray, data_root, tmp_path, capsys):
    out = tmp_path / "search"
    args = shared_args(data_root, "search.num_workers=3", "search.cpus_per_trial=1")  # 3 x 1 CPU, on 2 CPUs
    assert main(["search", str(SMOKE), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "num_workers=3 workers of a shared search run at once" in err and "holds 2 trials" in err
    assert not out.exists()


def test_num_samples_of_a_shared_search_on_ray_are_groups_with_their_own_seed_and_policy(local_ray, data_root,
                                                                                          tmp_path):
    out = tmp_path / "search"
    args = shared_args(data_root, "search.num_workers=2", "search.cpus_per_trial=1")
    assert main(["search", str(SMOKE), "--out", str(out), "--num-samples", "2", *args]) == 0
    groups: dict[int, list[Path]] = {}
    for trial, row in rows(out).items():
        assert row["status"] == "TERMINATED" and row["params"]["seed"] == row["params"]["search.group"]
        groups.setdefault(row["params"]["search.group"], []).append(out / trial / "fit")
    assert sorted(groups) == [0, 1] and all(len(fits) == 2 for fits in groups.values())
    learned = []
    for group, fits in groups.items():
        assert sorted(json.loads((d / "config.json").read_text())["seed"] for d in fits) == [group, 1000 + group]
        (tra, tea), (tra_b, tea_b) = [policy_logits(d) for d in fits]
        assert torch.equal(tra, tra_b) and torch.equal(tea, tea_b)  # one policy within a group
        state = torch.load(state_path(out, group), weights_only=True)
        # both workers of this group pushed at every one of the 2 x 2 meta-iterations, and no one else did
        assert state["contributions"] == 8 and state["round"] == 4 and torch.equal(state["tra_logits"], tra)
        learned.append(tra)
    assert not torch.equal(learned[0], learned[1])  # two searches, not one


@pytest.mark.slow
def test_a_worker_that_dies_rejoins_and_the_shared_policy_loses_nothing(local_ray, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed"))
    out = tmp_path / "search"
    args = shared_args(data_root, "search.num_workers=2", "train.epochs=3")
    assert main(["search", str(SMOKE), "--out", str(out), *args]) == 0
    found = rows(out)
    assert all(r["status"] == "TERMINATED" and r["metrics"]["epoch"] == 3 for r in found.values())
    assert sorted(r["metrics"]["resumed_epoch"] for r in found.values()) == [0, 1]
    # every meta-iteration of both workers reached the server exactly once: 2 workers x 3 epochs x 2 iterations
    assert torch.load(out / STATE_NAME, weights_only=True)["contributions"] == 12


@contextlib.contextmanager
def server_killed_after_the_first_validation(out: Path) -> Iterator[dict]:
    """Around a shared search into `out` run by this process: kills its policy server actor once the state file holds
    round 2 (written with the epoch-1 validations); Ray restarts it, as after a crash of its process. Yields a dict
    that then holds the restarted server's `info()`."""
    import ray

    seen: dict[str, object] = {}
    search_ended = threading.Event()

    def kill() -> None:
        while not search_ended.is_set():
            # the search's own ray.init first: a call before it would start a Ray of its own
            if ray.is_initialized() and (out / STATE_NAME).is_file():
                if torch.load(out / STATE_NAME, weights_only=True)["round"] >= 2:
                    server = ray.get_actor(actor_name(out))
                    ray.kill(server, no_restart=False)
                    seen["info"] = restarted_info(server)
                    return
            time.sleep(0.05)

    def restarted_info(server) -> dict | None:
        # ray.kill is asynchronous: a call right after it can still reach the old instance (resumed_from None), so
        # ask until an instance that resumed answers; after 120 s the last answer stands and the test reads it.
        deadline, info = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            try:
                info = ray.get(server.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:  # between the kill and the restart
                info = None
            if info is not None and info["resumed_from"] is not None:
                break
            time.sleep(0.1)
        return info

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        yield seen
    finally:
        search_ended.set()
        killer.join()


@pytest.mark.slow
def test_a_killed_policy_server_restarts_from_its_state_file_and_the_search_finishes(local_ray, data_root, tmp_path):
    out = tmp_path / "search"
    args = shared_args(data_root, "search.num_workers=2", "train.epochs=3")
    with server_killed_after_the_first_validation(out) as seen:
        assert main(["search", str(SMOKE), "--out", str(out), *args]) == 0
    info = seen["info"]
    assert info["resumed_from"] is not None and info["resumed_from"] >= 2  # the restarted server read its file
    found = rows(out)
    assert all(r["status"] == "TERMINATED" and r["metrics"]["epoch"] == 3 for r in found.values())
    assert all(r["metrics"]["resumed_epoch"] == 0 for r in found.values())  # the workers themselves never died
    state = torch.load(out / STATE_NAME, weights_only=True)
    # the rounds after the restart carry on from the saved one (2 more epochs of 2 meta-iterations at least), each
    # with both workers' contributions but for at most the one round the kill cut
    assert state["round"] >= info["resumed_from"] + 4
    assert 2 * state["round"] - 2 <= state["contributions"] <= 2 * state["round"]
    logits = [policy_logits(out / trial / "fit") for trial in sorted(found)]
    assert torch.equal(logits[0][0], logits[1][0]) and torch.equal(state["tra_logits"], logits[0][0])


@pytest.mark.slow
def test_an_interrupted_shared_search_on_ray_resumes_and_the_policy_loses_nothing(local_ray, data_root, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed"))
    out = tmp_path / "search"
    # one worker dies after its epoch-1 validation and is not restarted; the other waits one round for it, then goes on
    args = shared_args(data_root, "search.num_workers=2", "search.max_failures=0", "search.sync_timeout_s=5")
    assert main(["search", str(SMOKE), "--out", str(out), *args]) == 1
    first = rows(out)
    (done,) = [t for t, r in first.items() if r["status"] == "TERMINATED"]
    (broken,) = [t for t, r in first.items() if r["status"] == "ERROR"]
    done_log = (out / done / "fit" / "metrics.jsonl").read_text()
    assert torch.load(out / STATE_NAME, weights_only=True)["contributions"] == 2 * 2 + 2
    monkeypatch.delenv(CRASH_ENV)
    assert main(["search", "--resume", str(out)]) == 0
    second = rows(out)
    assert all(r["status"] == "TERMINATED" and r["metrics"]["epoch"] == 2 for r in second.values())
    assert second[broken]["metrics"]["resumed_epoch"] == 1  # from its epoch-1 checkpoint
    assert (out / done / "fit" / "metrics.jsonl").read_text() == done_log  # the finished worker did not run again
    state = torch.load(out / STATE_NAME, weights_only=True)
    # the resumed server went on from its file: every meta-iteration of both workers counted once (2 x 2 x 2)
    assert state["contributions"] == 8 and state["round"] == 6
    assert torch.equal(state["tra_logits"], policy_logits(out / broken / "fit")[0])
