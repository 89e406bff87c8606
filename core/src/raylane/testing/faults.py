"""Faults injected from outside the workers: real signals to the real processes of a running fit.

The in-model faults (``ClassifierModel(fail_mode=...)``) cover a rank that raises, kills itself, hangs or freezes.
These cover what happens to a healthy rank from the outside: the OOM killer, an operator's ``kill``, a frozen host.
"""

from __future__ import annotations

import os
import time

import ray
from ray.util import list_named_actors


def worker_pid(rank: int, timeout_s: float = 60.0) -> int:
    """The process id of the live raylane worker with this rank, waiting up to ``timeout_s`` for it to start.

    Asks the worker itself (it answers on its second thread while an entry point runs), so it is the real pid on
    this machine; the test's Ray must be local for a signal to reach it.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for actor in list_named_actors(all_namespaces=True):
            if actor["name"].startswith("raylane:") and actor["name"].endswith(f":rank-{rank}"):
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                return int(ray.get(handle.pid.remote(), timeout=timeout_s))
        time.sleep(0.1)
    raise TimeoutError(f"no raylane worker with rank {rank} started within {timeout_s:g} s")


def wait_for_file(path: str | os.PathLike[str], timeout_s: float = 120.0) -> None:
    """Wait until ``path`` exists: a marker a model writes once training has started (``fail_once_marker``,
    ``report_dir``), so a fault lands in training rather than during the workers' start-up."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:g} s")
        time.sleep(0.05)


def signal_worker(
    rank: int, signal_number: int, timeout_s: float = 60.0, after: str | os.PathLike[str] | None = None
) -> int:
    """Send ``signal_number`` to the worker process with this rank, once the file ``after`` exists; return its pid."""
    if after is not None:
        wait_for_file(after, timeout_s=max(timeout_s, 120.0))
    pid = worker_pid(rank, timeout_s)
    os.kill(pid, signal_number)
    return pid
