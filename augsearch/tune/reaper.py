"""Ends the processes of a local Ray when the driver that started it dies without shutting it down (SIGKILL, OOM).

Ray's own fate sharing ends the GCS and raylet with their driver, but the raylet's agents (dashboard, runtime env)
and workers are reparented to init and can linger for minutes. The driver starts this reaper just before `ray.init`
(`Reaper()`), with the children it already has; the reaper watches a pipe from the driver and, every `SNAPSHOT_S`
seconds, notes the driver's other descendants (pid and start time): Ray's processes. When the pipe closes without
the driver's "done" line (`Reaper.done()`, after `ray.shutdown()`), the driver is gone: the reaper stops the noted
processes (and anything they started since), then kills them. Processes are matched by pid and start time, so a
reused pid is never hit.

Run as `python -m augsearch.tune.reaper DRIVER_PID [KEEP_PID...]`; Linux only (/proc), elsewhere `Reaper` does
nothing. `running_children`, `all_running` and `one_ends_within` tell a driver whether the processes it started are
still up (search and service use them to notice a signal sent to the whole process group).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

SNAPSHOT_S = 0.5
DONE = b"done\n"


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks since boot), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _alive_since(pid: int) -> str | None:
    """PID's start time (clock ticks since boot) while it runs; None once it has exited or is a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def running_children() -> dict[int, str]:
    """This process's running children (after `ray.init` of a local Ray: its GCS, raylet, dashboard and monitors):
    pid -> start time. Empty off Linux."""
    if not sys.platform.startswith("linux"):
        return {}
    me = os.getpid()
    return {pid: start for pid, (parent, start) in _process_table().items()
            if parent == me and _alive_since(pid) == start}


def all_running(processes: dict[int, str]) -> bool:
    """Whether every process of PROCESSES (pid -> start time, from `running_children`) still runs; one that has
    exited or is a zombie has not, and a reused pid is told apart by its start time."""
    return all(_alive_since(pid) == start for pid, start in processes.items())


def one_ends_within(processes: dict[int, str], seconds: float) -> bool:
    """Whether one of PROCESSES (from `running_children`) stops running within SECONDS (polled every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while all_running(processes):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found, frontier = set(), list(roots)
    while frontier:
        pid = frontier.pop()
        for child, (parent, _) in table.items():
            if parent == pid and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def reap(noted: dict[int, str]) -> None:
    """Stop every noted process that still has its start time, then whatever they started, then kill them all."""
    table = _process_table()
    alive = {pid for pid, start in noted.items() if table.get(pid, (0, None))[1] == start}
    stopped: set[int] = set()
    while alive - stopped:  # stopped processes cannot fork: the set reaches a fixed point
        _signal_all(alive - stopped, signal.SIGSTOP)
        stopped |= alive
        alive |= _descendants(alive, _process_table())
    _signal_all(stopped, signal.SIGKILL)


def watch(driver: int, keep: set[int]) -> None:
    """Note DRIVER's descendants outside KEEP until stdin closes; reap them unless the driver said it shut Ray down."""
    noted: dict[int, str] = {}
    keep.add(os.getpid())
    received = b""
    while True:
        readable, _, _ = select.select([sys.stdin.buffer], [], [], SNAPSHOT_S)
        if readable:
            chunk = os.read(sys.stdin.fileno(), 64)
            if not chunk:
                break
            received += chunk
            continue
        table = _process_table()
        roots = {pid for pid, (parent, _) in table.items() if parent == driver and pid not in keep}
        noted.update({pid: table[pid][1] for pid in roots | _descendants(roots, table) if pid in table})
    if received != DONE:
        reap(noted)


class Reaper:
    """The driver's end: create it just before `ray.init`, call `done()` after `ray.shutdown()`."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        if not sys.platform.startswith("linux"):
            return
        me = os.getpid()
        keep = [pid for pid, (parent, _) in _process_table().items() if parent == me]
        # its own session: a Ctrl-C or a kill of the driver's process group does not end the reaper first
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(me), *map(str, keep)], stdin=subprocess.PIPE, start_new_session=True
        )

    def done(self) -> None:
        if self._process is None:
            return
        self._process.stdin.write(DONE)
        self._process.stdin.close()
        self._process.wait()
        self._process = None


if __name__ == "__main__":
    watch(int(sys.argv[1]), {int(arg) for arg in sys.argv[2:]})
