"""Process and port helpers for tests that start servers or Ray: free loopback ports and the processes below a pid,
read from /proc."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it, so tests running side by side do not clash)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(root: int) -> dict[int, str]:
    """Processes below `root` (pid -> command line), from /proc."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return {pid: cmd for pid, cmd in commands.items() if below(pid)}


def ray_processes() -> list[int]:
    """The Ray head processes (raylet, GCS) below this test process."""
    return [pid for pid, cmd in descendants(os.getpid()).items() if "raylet" in cmd or "gcs_server" in cmd]


def assert_loopback_only() -> None:
    """Every TCP socket our Ray processes listen on is bound to 127.0.0.1."""
    ours = set(descendants(os.getpid())) | {os.getpid()}
    lines = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    listening = [line.split()[3] for line in lines
                 if any(int(pid) in ours for pid in re.findall(r"pid=(\d+)", line))]
    assert listening and all(addr.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")) for addr in listening), listening


def assert_no_ray_left() -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ray_processes():
        time.sleep(0.5)
    assert not ray_processes()
