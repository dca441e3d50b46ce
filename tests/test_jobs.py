"""Search jobs through Ray's job submission SDK on a real local Ray head (127.0.0.1, token authentication on):
submit a smoke search, follow it, read its status and export it; stop a longer one and resubmit it, which finishes
the search without training a finished trial again. The rules that need no cluster are tested without one."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from processes import free_port
from smoke import set_args

from augsearch.cli import main
from augsearch.config import load_config
from augsearch.service import jobs
from augsearch.service.progress import read_metrics, search_progress

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.toml"
HEAD_START_S = 120.0


def _processes_under(temp_dir: str) -> list[int]:
    """Live processes whose command line names this head's temp dir (GCS, raylet, dashboard, agents)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if temp_dir in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def head():
    """A Ray head with its job server on 127.0.0.1 and token authentication, stopped (with every process it
    started) at the end. The token reaches this process through RAY_AUTH_TOKEN, as it would a user's shell."""
    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp")  # short: Ray's socket paths must stay short
    port, dashboard = free_port(), free_port()
    # every port a head listens on, not only the GCS and the dashboard: other Ray heads may run on this machine
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "runtime-env-agent-port", "metrics-export-port",
                                                      "ray-client-server-port", "node-manager-port",
                                                      "object-manager-port")]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # Tune saves its search state every 2 s instead of every 10 s or more: a stop soon after a checkpoint
           # then finds the checkpoint recorded, so the stopped trial can be short
           "TUNE_GLOBAL_CHECKPOINT_S": "2",
           # the job's entrypoint imports augsearch from this checkout, as an installed package would be found
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = open(Path(temp_dir) / "head.log", "w")
    process = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=3", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ.update(RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            assert process.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            try:
                jobs.connect(address)
                break
            except jobs.JobError:
                assert time.monotonic() < deadline, f"no job server at {address} after {HEAD_START_S:.0f} s"
                time.sleep(1.0)
        yield address
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # `ray start --block` stops the node's processes on SIGTERM; whatever is left is killed by its PID
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _processes_under(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _processes_under(temp_dir):
            os.kill(pid, signal.SIGKILL)
        log.close()
        time.sleep(1.0)
        assert not _processes_under(temp_dir), "processes of the test's Ray head survived it"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_args(address: str, out: Path, data: Path, *extra: str) -> list[str]:
    sets = [f"data.root={json.dumps(str(data))}", *extra]
    return ["submit", str(SMOKE), "--address", address, "--out", str(out)] + set_args(sets)


def _submitted_id(text: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith("submitted job "))
    return line.split()[2]


@pytest.mark.slow
def test_submit_follow_status_export(head, tmp_path, capsys):
    args = _submit_args(head, tmp_path / "jobs", tmp_path / "data", "train.epochs=1", "train.iterations=2")
    assert main(args) == 0
    job = _submitted_id(capsys.readouterr().out)
    cfg = load_config(SMOKE, [f"data.root={json.dumps(str(tmp_path / 'data'))}", "train.epochs=1",
                              "train.iterations=2"])
    assert job == jobs.job_base_id("smoke", cfg.fingerprint())  # data.root was absolute already: same hash

    assert main(["jobs", "logs", job, "--follow", "--address", head]) == 0
    followed = capsys.readouterr().out
    assert "[smoke:" in followed and "by val/dice_rare =" in followed  # trial lines and the driver's end

    assert main(["jobs", "status", job, "--address", head]) == 0
    status = capsys.readouterr().out
    assert f"job {job}: SUCCEEDED" in status
    run_dir = tmp_path / "jobs" / job
    rows = json.loads((run_dir / "summary.json").read_text())["trials"]
    assert len(rows) == 2 and all(row["status"] == "TERMINATED" for row in rows)
    for row in rows:  # the trial table, one line per trial
        assert any(line.startswith(row["trial"]) and "TERMINATED" in line for line in status.splitlines())
    assert "best val/dice_rare (max) so far" in status

    assert main(["jobs", "list", "--address", head]) == 0
    assert job in capsys.readouterr().out
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "checkpoint.pt").is_file() and (tmp_path / "export" / "policy.json").is_file()

    # the same search again: it has finished, so nothing is submitted and the message says where its results are
    assert main(args) == 2
    assert "already finished" in capsys.readouterr().err


@pytest.mark.slow
def test_stopped_search_resubmitted_finishes_without_repeating_finished_trials(head, tmp_path, capsys):
    # one trial at a time: the first finishes, the second is stopped part way
    epochs = 24
    args = _submit_args(head, tmp_path / "jobs", tmp_path / "data", f"train.epochs={epochs}", "train.iterations=2",
                        "search.max_concurrent_trials=1") + ["--ship-code"]
    assert main(args) == 0
    first = _submitted_id(capsys.readouterr().out)
    run_dir = tmp_path / "jobs" / first
    assert main(args) == 2  # while it runs, submitting it again says so and submits nothing
    assert "already" in capsys.readouterr().err

    deadline = time.monotonic() + 300  # a bound on a hang, not a speed check: CI machines may be loaded
    while True:
        assert time.monotonic() < deadline, "the second trial never started"
        assert jobs.status(first, head).status in jobs.ACTIVE, jobs.logs(first, head)[-3000:]
        rows = search_progress(run_dir, running=True).rows if (run_dir / "search.json").is_file() else []
        if len(rows) == 2 and rows[0]["status"] == "TERMINATED":
            # stop once Tune has saved its state after the second trial's first checkpoint, so it resumes from it
            checkpoints = glob.glob(str(run_dir / rows[1]["trial"] / "checkpoint_*"))
            saved = [os.path.getmtime(p) for p in glob.glob(str(run_dir / "experiment_state-*.json"))]
            if checkpoints and max(saved) > min(os.path.getmtime(c) for c in checkpoints):
                break
        time.sleep(0.5)
    finished, stopped = rows[0]["trial"], rows[1]["trial"]
    assert main(["jobs", "stop", first, "--address", head]) == 0
    assert "STOPPED" in capsys.readouterr().out
    progress = search_progress(run_dir)
    assert not progress.finished and [r["status"] for r in progress.rows] == ["TERMINATED", "UNFINISHED"]
    finished_metrics = (run_dir / finished / "fit" / "metrics.jsonl").read_bytes()
    stopped_at = read_metrics(run_dir / stopped / "fit")[-1]["epoch"]
    assert 0 < stopped_at < epochs

    assert main(args) == 0
    out = capsys.readouterr().out
    second = _submitted_id(out)
    assert second == f"{first}-r2" and "resuming the search" in out and str(run_dir) in out
    assert main(["jobs", "logs", second, "--follow", "--address", head]) == 0
    log = capsys.readouterr().out
    assert "resuming the search" in log
    assert f"[smoke:{finished}] epoch" not in log  # the finished trial did not train again
    # the driver's own trial table (worker lines are forwarded asynchronously and may arrive after the job ends)
    table_rows = [line.split() for line in log.splitlines() if line.startswith(f"{stopped} ")]
    assert table_rows and "TERMINATED" in table_rows[-1], log[-3000:]
    assert (run_dir / finished / "fit" / "metrics.jsonl").read_bytes() == finished_metrics
    rows = {row["trial"]: row for row in search_progress(run_dir).rows}
    assert all(row["status"] == "TERMINATED" and row["metrics"]["epoch"] == epochs for row in rows.values())
    assert rows[finished]["metrics"]["resumed_epoch"] == 0
    assert rows[stopped]["metrics"]["resumed_epoch"] > 0  # continued from its checkpoint, not from the start
    assert [r["epoch"] for r in read_metrics(run_dir / stopped / "fit")] == list(range(1, epochs + 1))


@pytest.mark.slow
def test_a_wrong_token_is_refused_with_a_message(head, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["jobs", "list", "--address", head]) == 2
    assert "token" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- without a cluster


def test_job_ids_follow_the_config_hash_and_name():
    a, b = "a" * 64, "b" * 64
    assert jobs.job_base_id("smoke", a) == jobs.job_base_id("smoke", a) == "augsearch-smoke-aaaaaaaaaaaa"
    assert jobs.job_base_id("smoke", b) != jobs.job_base_id("smoke", a)
    assert jobs.job_base_id("My Search!", a) == "augsearch-my-search-aaaaaaaaaaaa"
    base = jobs.job_base_id("smoke", a)
    assert [jobs._attempt(base, i) for i in (base, f"{base}-r2", f"{base}-r13", f"{base}x", "raysubmit_1", None)] \
        == [1, 2, 13, None, None, None]


def test_storage_must_be_shared_on_a_multi_node_cluster():
    jobs._check_storage("runs/jobs", ["data.root"], nodes=1)  # one node: relative paths resolve here
    with pytest.raises(jobs.JobError, match="--out runs/jobs.*shared path"):
        jobs._check_storage("runs/jobs", [], nodes=2)
    with pytest.raises(jobs.JobError, match="data.root"):
        jobs._check_storage("/mnt/shared/runs", ["data.root"], nodes=3)
    jobs._check_storage("/mnt/shared/runs", [], nodes=3)
    with pytest.raises(jobs.JobError, match="storage URI"):
        jobs._check_storage("s3://bucket/runs", [], nodes=1)


def test_relative_config_paths_are_made_absolute_and_named():
    cfg = load_config(SMOKE)  # data.root = "runs/data/smoke2d"
    absolute, relative = jobs._cluster_config(cfg)
    assert relative == ["data.root"] and Path(absolute.data.root).is_absolute()
    again, none = jobs._cluster_config(absolute)
    assert none == [] and again.fingerprint() == absolute.fingerprint()


def test_the_token_comes_from_the_environment_before_the_file(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert jobs.auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.auth_token() is None


def test_drive_refuses_a_folder_of_another_search(tmp_path):
    cfg = load_config(SMOKE, [f"data.root={json.dumps(str(tmp_path / 'data'))}"])
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("something else")
    with pytest.raises(jobs.JobError, match="holds files but no started search"):
        jobs.drive(config_file, run_dir)
    (run_dir / "notes.txt").unlink()
    (run_dir / "tuner.pkl").write_bytes(b"")
    (run_dir / "search.json").write_text(json.dumps({"format": "augsearch-search", "config_hash": "0" * 64}))
    with pytest.raises(jobs.JobError, match="holds another search"):
        jobs.drive(config_file, run_dir)


def test_status_reads_live_progress_of_a_stopped_search(tmp_path):
    """Without summary.json, each trial's fit/metrics.jsonl and config.json give its row; a cut last line is
    tolerated, a broken line before it is not."""
    from augsearch.service.progress import ProgressError

    cfg = load_config(SMOKE, ["train.epochs=3"])
    run_dir = tmp_path / "search"
    manifest = {"format": "augsearch-search", "config": cfg.to_dict(), "space": {"seed": [0, 1]},
                "metric": "val/dice_rare", "mode": "max"}
    run_dir.mkdir()
    (run_dir / "search.json").write_text(json.dumps(manifest))
    for trial, seed, epochs in (("t0", 0, 3), ("t1", 1, 1)):
        fit = run_dir / trial / "fit"
        fit.mkdir(parents=True)
        (fit / "config.json").write_text(json.dumps({**cfg.to_dict(), "seed": seed}))
        (fit / "checkpoint.pt").write_bytes(b"")
        lines = [json.dumps({"epoch": e, "train/loss": 1.0 / e, "val/dice_rare": 0.1 * e + seed})
                 for e in range(1, epochs + 1)]
        (fit / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"epoch\": 9, \"val")
    progress = search_progress(run_dir)
    assert [(r["trial"], r["status"], r["params"], r["metrics"]["epoch"]) for r in progress.rows] == \
        [("t0", "TERMINATED", {"seed": 0}, 3), ("t1", "UNFINISHED", {"seed": 1}, 1)]
    assert progress.best["trial"] == "t1" and progress.best["checkpoint"] == os.path.join("t1", "fit")
    assert search_progress(run_dir, running=True).rows[1]["status"] == "RUNNING"
    (run_dir / "t0" / "fit" / "metrics.jsonl").write_text("not json\n" + json.dumps({"epoch": 1}) + "\n")
    with pytest.raises(ProgressError, match="metrics.jsonl:1"):
        search_progress(run_dir)
