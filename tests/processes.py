"""Process and port helpers for tests that start servers or Ray: free loopback ports and the processes below a pid."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time

import psutil


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it, so tests running side by side do not clash)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(root: int) -> dict[int, str]:
    """Processes below `root` (pid -> command line); empty when `root` is gone."""
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for child in children:
        with contextlib.suppress(psutil.Error):  # it may end while we look
            found[child.pid] = " ".join(child.cmdline())
    return found


def ray_processes() -> list[int]:
    """The Ray head processes (raylet, GCS) below this test process."""
    return [pid for pid, cmd in descendants(os.getpid()).items() if "raylet" in cmd or "gcs_server" in cmd]


def assert_loopback_only() -> None:
    """Every TCP socket our Ray processes listen on is bound to 127.0.0.1."""
    ours = set(descendants(os.getpid())) | {os.getpid()}
    lines = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    listening = [line.split()[3] for line in lines
                 if any(int(pid) in ours for pid in re.findall(r"pid=(\d+)", line))]
    assert listening and all(
        addr.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")) for addr in listening
    ), listening


def init_local_ray() -> None:
    """Starts a private loopback-only Ray (2 CPUs, small object store) in this process.

    address="local": without it ray.init joins any Ray head it finds running on the machine (another test's, another
    user's), and then refuses num_cpus."""
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False,
             _node_ip_address="127.0.0.1")


def assert_no_ray_left() -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ray_processes():
        time.sleep(0.5)
    assert not ray_processes()
