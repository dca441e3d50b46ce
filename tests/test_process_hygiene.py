"""Process hygiene: a private local Ray, a clear refusal of a non-Ray address, no Ray process left after a signal,
SIGTERM handled like Ctrl-C, search.max_concurrent_trials honoured. Everything on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from processes import descendants, free_port, init_local_ray
from smoke import SMOKE, set_args

from augsearch.cli import main

ROOT = Path(__file__).resolve().parents[1]
RAY_PROCESS_NAMES = ("raylet", "gcs_server", "dashboard", "agent", "ray::", "log_monitor", "monitor.py")


def tiny(data_root: Path, *extra: str) -> list[str]:
    sets = ["train.iterations=2", "model.depth=2", f"data.root={json.dumps(str(data_root))}", *extra]
    return set_args(sets)


def ray_descendants(root: int) -> dict[int, float]:
    """pid -> start time of the Ray processes below ROOT."""
    found = {}
    for pid, cmd in descendants(root).items():
        if any(n in cmd for n in RAY_PROCESS_NAMES):
            with contextlib.suppress(psutil.Error):
                found[pid] = psutil.Process(pid).create_time()
    return found


def survivors(noted: dict[int, float], wait_s: float = 20.0) -> dict[int, str]:
    """The noted processes (same pid and start time, not zombies) still running after up to WAIT_S seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        left = {}
        for pid, start in noted.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == start and proc.status() != psutil.STATUS_ZOMBIE:
                    left[pid] = " ".join(proc.cmdline())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def start_cli(*args: str, start_new_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen([sys.executable, "-m", "augsearch", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=start_new_session)


def wait_for(condition, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------- addresses


def test_address_that_accepts_tcp_but_is_not_ray_fails_fast(tmp_path, data_root):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []
    threading.Thread(target=lambda: held.extend(iter(lambda: server.accept()[0], None)), daemon=True).start()
    out = tmp_path / "out"
    try:
        proc = start_cli("search", str(SMOKE), "--address", f"127.0.0.1:{server.getsockname()[1]}",
                         "--out", str(out), *tiny(data_root))
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("a non-Ray address hangs the search") from None
    finally:
        server.close()
    assert proc.returncode == 2, err
    assert "is not the head of a Ray cluster" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_local_ray_is_private_whatever_ray_address_says(monkeypatch):
    import ray

    from augsearch.tune.ray_tune import ray_session

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # another cluster, long gone
    with ray_session(None):
        assert ray.is_initialized()
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.startswith("127.0.0.1:") and gcs != os.environ["RAY_ADDRESS"]
        noted = ray_descendants(os.getpid())
        assert noted
    assert not ray.is_initialized()
    assert not survivors(noted)


# ----------------------------------------------------------------------------------------------- signals


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_running_children_tells_an_ended_child_and_a_zombie_from_a_running_one():
    from augsearch.tune.reaper import all_running, running_children

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        children = running_children()
        assert child.pid in children and all_running(children)
        assert all_running({child.pid: children[child.pid]})
        assert not all_running({child.pid: "0"}), "a reused pid (another start time) is not the noted process"
        child.kill()
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not all_running(children), "a killed child that nobody waited for (a zombie) still counts as running"
        assert child.pid not in running_children()
    finally:
        child.kill()
        child.wait()
    assert not all_running({child.pid: children[child.pid]})


@pytest.mark.slow
def test_sigkill_of_a_search_leaves_no_ray_process(tmp_path, data_root):
    out = tmp_path / "s"
    proc = start_cli("search", str(SMOKE), "--out", str(out), *tiny(data_root, "train.epochs=500"))
    wait_for(lambda: (out / "tuner.pkl").is_file(), 300, proc)  # Ray up, its agents running, Tune started
    time.sleep(2)
    noted = ray_descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Ray's agents notice a dead raylet on their own only after tens of seconds, if at all
    assert not survivors(noted, wait_s=5.0), "Ray processes outlived their killed driver"


@pytest.mark.slow
def test_sigterm_of_a_search_stops_it_like_ctrl_c(tmp_path, data_root):
    out = tmp_path / "s"
    proc = start_cli("search", str(SMOKE), "--out", str(out), *tiny(data_root, "train.epochs=500"))
    wait_for(lambda: (out / "tuner.pkl").is_file(), 300, proc)
    time.sleep(2)
    noted = ray_descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # Ray forwards its workers' output prefixed "(name pid=...)": a worker ended while importing may print its own
    # SystemExit there. The driver's own lines are what the user is shown.
    driver = "\n".join(line for line in err.splitlines() if not line.startswith("("))
    assert ("Stack trace" not in driver and "SIGTERM received" not in driver
            and "Traceback" not in driver), driver[-3000:]
    # Tune's own Ctrl-C path: state saved, the search reported as interrupted with the resume command
    assert proc.returncode == 130 and "interrupted; resume with" in driver, driver[-3000:]
    assert json.loads((out / "summary.json").read_text()).get("interrupted") is True
    assert not survivors(noted)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_of_a_search_stops_it_resumable(tmp_path, data_root):
    """systemd, Slurm's scancel and `kill -- -PGID` signal Ray's own processes too: Tune's cleanup must not wait for
    a GCS that is going away (Ray would end the driver with status 1 after 60 s)."""
    out = tmp_path / "s"
    proc = start_cli("search", str(SMOKE), "--out", str(out), *tiny(data_root, "train.epochs=500"),
                     start_new_session=True)
    wait_for(lambda: (out / "tuner.pkl").is_file(), 300, proc)
    time.sleep(2)
    noted = ray_descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    driver = "\n".join(line for line in err.splitlines() if not line.startswith("("))
    assert proc.returncode == 130 and "interrupted; resume with" in driver, driver[-3000:]
    assert "Failed to connect to GCS" not in driver and "Traceback" not in driver, driver[-3000:]
    assert not survivors(noted)
    assert list(out.glob("experiment_state-*.json")), "Tune saved no state to resume from"


@pytest.mark.slow
def test_sigterm_of_train_ends_with_a_resume_hint(tmp_path, data_root):
    out = tmp_path / "run"
    proc = start_cli("train", str(SMOKE), "--out", str(out), "--quiet", *tiny(data_root, "train.epochs=5000"))
    wait_for(lambda: (out / "checkpoint.pt").is_file(), 300, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "augsearch train: interrupted; continue from the last checkpoint with augsearch train" in err
    assert f"--resume {out}" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_max_concurrent_trials_one_runs_trials_one_after_another(tmp_path, data_root):
    import ray

    init_local_ray()
    try:
        out = tmp_path / "s"
        # two trials of one CPU each on two CPUs: side by side unless the limit holds
        args = tiny(data_root, "train.epochs=2", "search.max_concurrent_trials=1")
        assert main(["search", str(SMOKE), "--out", str(out), *args]) == 0
    finally:
        ray.shutdown()
    rows = json.loads((out / "summary.json").read_text())["trials"]
    spans = sorted((row["timing"]["trial_start"], row["timing"]["last_report"]) for row in rows)
    assert len(spans) == 2 and spans[0][1] < spans[1][0], spans
