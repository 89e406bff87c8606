"""Faults for the tests: real signals to the real processes of a running fit, and a rank killed once from inside.

The in-model faults (``ClassifierModel(fail_mode=...)``) cover a rank that raises, kills itself, hangs or freezes;
``KilledOnce`` names the one every restart test uses. The signals cover what happens to a healthy rank from the
outside: the OOM killer, an operator's ``kill``, a frozen host.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util import list_named_actors


@dataclass(frozen=True)
class KilledOnce:
    """One rank kills its own process at a step of the first attempt only, as the OOM killer would: a
    ``max_failures`` restart then trains through, since the marker file the first kill leaves stops the second.

    ``ClassifierModel(**killed.model_options(), ...)`` (or a subclass) injects it; ``killed.happened`` tells a test
    that the fault really landed, so a restart test cannot pass on a run that never failed.
    """

    rank: int
    at_step: int
    folder: Path  # where the marker goes: the test's own tmp_path

    @property
    def marker(self) -> Path:
        return Path(self.folder) / "failed-once"

    @property
    def happened(self) -> bool:
        return self.marker.exists()

    def model_options(self) -> dict[str, Any]:
        return {
            "fail_on_rank": self.rank,
            "fail_at_step": self.at_step,
            "fail_mode": "kill",
            "fail_once_marker": str(self.marker),
        }


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
