"""A search joining a two-node Ray cluster (head + worker, both on 127.0.0.1) places trials on both nodes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import assert_no_ray_left
from test_policy_server import policy_logits, server_killed_after_the_first_validation

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.artifacts.layout import CHECKPOINT_NAME
from augsearch.cli import main
from augsearch.config import load_config
from augsearch.learn.server import STATE_NAME
from augsearch.train import _build_policy
from augsearch.tune.trial import CRASH_ENV

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"


SHARED = ["search.policy_sharing=shared", "search.space={}", "search.sync_timeout_s=60"]
SHARED2 = [*SHARED, "search.num_workers=2"]
SHARED4 = [*SHARED, "search.num_workers=4", "search.cpus_per_trial=0.5"]  # two workers on each node's CPU


@contextlib.contextmanager
def two_node_cluster(monkeypatch) -> Iterator[Any]:
    """A Ray head and one worker node on 127.0.0.1, one CPU each, without token authentication on a machine that
    holds a token (a local Ray writes one to ~/.ray/auth_token): the driver must follow the cluster, not the token.
    No Ray process is left after."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token-this-cluster-does-not-use")
    node = {"num_cpus": 1, "object_store_memory": 120 * 2**20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
    assert_no_ray_left()


def search_args(cluster: Any, out: Path, data: Path, *sets: str) -> list[str]:
    sets = ("train.epochs=2", "train.iterations=2", f"data.root={json.dumps(str(data))}", "search.cpus_per_trial=1",
            *sets)
    return ["search", str(SMOKE), "--address", cluster.address, "--out", str(out), *(a for s in sets
                                                                                    for a in ("--set", s))]


@pytest.mark.slow
@pytest.mark.parametrize(("sharing", "crash"), [([], False), (SHARED2, False), (SHARED4, False), (SHARED2, True)],
                         ids=["independent", "shared2", "shared4", "shared2-worker-dies"])
def test_search_trials_run_on_both_nodes_of_a_two_node_cluster(tmp_path, monkeypatch, sharing, crash):
    import ray

    if crash:  # the first worker to report a checkpoint dies there; Tune restarts it from that checkpoint
        monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed"))
    with two_node_cluster(monkeypatch) as cluster:
        expected = {node.node_id for node in cluster.list_all_nodes()}  # the head and the worker
        out = tmp_path / "search"
        workers = 4 if sharing == SHARED4 else 2
        assert main(search_args(cluster, out, tmp_path / "data", *sharing)) == 0
        assert not ray.is_initialized()  # the driver left the cluster; the cluster itself keeps running
        rows = json.loads((out / "summary.json").read_text())["trials"]
        assert len(rows) == workers and all(r["status"] == "TERMINATED" for r in rows)
        # one CPU per node and one CPU (or half) per trial: the trials ran side by side, on both nodes
        assert {r["node_id"] for r in rows} == expected
        resumed = sorted(r["metrics"]["resumed_epoch"] for r in rows)
        assert resumed == ([0, 1] if crash else [0] * workers)
        if sharing:  # every worker pushed every meta-iteration (2 x 2) to the one policy server, a dead one too
            state = torch.load(out / STATE_NAME, weights_only=True)
            assert state["contributions"] == 4 * workers and state["round"] == 4
            fits = [out / r["trial"] / "fit" for r in rows]
            logits = [policy_logits(d) for d in fits]
            tra_a, tea_a = logits[0]
            assert all(torch.equal(tra, tra_a) and torch.equal(tea, tea_a) for tra, tea in logits)
            assert torch.equal(state["tra_logits"], tra_a)
            start = _build_policy(load_config(SMOKE), load_checkpoint(fits[0] / CHECKPOINT_NAME).label_names,
                                  (1.0, 1.0), log=lambda message: None)  # the policy both workers joined with
            assert not torch.equal(start.tra_logits.detach(), tra_a)
            assert not torch.equal(start.tea_logits.detach(), tea_a)


@pytest.mark.slow
def test_a_shared_search_on_the_cluster_outlives_a_killed_server_and_resumes_after_an_interruption(tmp_path,
                                                                                                  monkeypatch):
    with two_node_cluster(monkeypatch) as cluster:
        # the policy server's process dies after the epoch-1 validations: Ray restarts it from its state file
        killed = tmp_path / "killed"
        with server_killed_after_the_first_validation(killed) as seen:
            assert main(search_args(cluster, killed, tmp_path / "data", *SHARED2, "train.epochs=3")) == 0
        assert seen["info"]["resumed_from"] >= 2
        found = json.loads((killed / "summary.json").read_text())["trials"]
        assert all(r["status"] == "TERMINATED" and r["metrics"]["epoch"] == 3 for r in found)
        state = torch.load(killed / STATE_NAME, weights_only=True)
        assert state["round"] >= seen["info"]["resumed_from"] + 4  # went on from the saved round, not from 0
        assert torch.equal(state["tra_logits"], policy_logits(killed / found[0]["trial"] / "fit")[0])

        # a worker dies after its epoch-1 validation and is not restarted; the other waits one round for it and
        # finishes alone; `--resume --address` finishes the dead one from its checkpoint on the same cluster
        monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed"))
        cut = tmp_path / "cut"
        sets = (*SHARED2, "search.max_failures=0", "search.sync_timeout_s=5")
        assert main(search_args(cluster, cut, tmp_path / "data", *sets)) == 1
        first = {r["trial"]: r for r in json.loads((cut / "summary.json").read_text())["trials"]}
        (broken,) = [t for t, r in first.items() if r["status"] == "ERROR"]
        assert torch.load(cut / STATE_NAME, weights_only=True)["contributions"] == 2 * 2 + 2
        monkeypatch.delenv(CRASH_ENV)
        assert main(["search", "--resume", str(cut), "--address", cluster.address]) == 0
        second = {r["trial"]: r for r in json.loads((cut / "summary.json").read_text())["trials"]}
        assert all(r["status"] == "TERMINATED" and r["metrics"]["epoch"] == 2 for r in second.values())
        assert second[broken]["metrics"]["resumed_epoch"] == 1
        state = torch.load(cut / STATE_NAME, weights_only=True)
        assert state["contributions"] == 8 and state["round"] == 6  # every meta-iteration of both workers, once
        assert torch.equal(state["tra_logits"], policy_logits(cut / broken / "fit")[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token", "disabled"])
def test_a_driver_joining_a_cluster_follows_its_auth_mode(monkeypatch, mode):
    """Whatever token this machine holds, the driver speaks the head's auth mode: the actors it owns start."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    from augsearch.tune.ray_tune import check_reachable, ray_session

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 32)
    monkeypatch.setenv("RAY_AUTH_MODE", mode)  # the cluster's processes read it when they start
    reset_auth_token_state()  # and this process, which starts them, must read it too
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled" if mode == "token" else "token")  # the driver's own guess
        reset_auth_token_state()
        assert check_reachable(cluster.address) is (mode == "token")
        with ray_session(cluster.address):
            class Counter:  # defined here, so that Ray ships it by value to a worker that cannot import this file
                def __init__(self) -> None:
                    self.total = 0

                def add(self, n: int) -> int:
                    self.total += n
                    return self.total

            counter = ray.remote(num_cpus=0)(Counter).remote()
            assert ray.get(counter.add.remote(2), timeout=60) == 2
        assert os.environ["RAY_AUTH_MODE"] == ("disabled" if mode == "token" else "token")  # given back
    finally:
        cluster.shutdown()
        monkeypatch.undo()
        reset_auth_token_state()
    assert_no_ray_left()
