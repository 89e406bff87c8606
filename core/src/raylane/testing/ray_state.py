"""Ray state checks for tests: start a local Ray once, and prove a run released everything it reserved."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import ray
from ray.util import list_named_actors, placement_group_table

from raylane import _ray, local_ray, release_idle_workers

TEST_CPUS = 4  # two workers plus room for the trial drivers Tune tests add; oversubscribes a 2-core machine on purpose


def ensure_local_ray(num_cpus: int = TEST_CPUS) -> None:
    """Start a local Ray of ``num_cpus`` CPUs for tests unless this process runs one with at least that many.

    A smaller one that an earlier test's Trainer started (raylane sizes its own Ray for the workers, no more) is
    replaced, so a subset of the suite runs in any order. A Ray the tests set up themselves (a simulated cluster) is
    left as it is.
    """
    if ray.is_initialized():
        if not local_ray.owns_running_ray() or ray.cluster_resources().get("CPU", 0) >= num_cpus:
            return
        release_dropped_trainers_workers()
        local_ray.stop_own_ray()
    # address="local": a new instance of our own, never a cluster another process left running on this machine.
    # Its dashboard agent on a free port: the Rays a test starts beside it (a script's, a cluster's head) then
    # find Ray's default one free instead of waiting 3.4 s for it (raylane._ray.agent_port_of_its_own).
    with _ray.agent_port_of_its_own():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def release_dropped_trainers_workers() -> None:
    """Stop the idle workers earlier Trainers left, for a test that needs fresh workers or checks that its own run
    released everything. Tests in between train on them, as a script's later Trainers do."""
    gc.collect()  # a dropped Trainer hands its workers over when Python frees it
    release_idle_workers()


def live_raylane_actors() -> list[str]:
    named = list_named_actors(all_namespaces=True)
    return [actor["name"] for actor in named if actor["name"].startswith("raylane:")]


def live_raylane_placement_groups() -> list[str]:
    return [
        info["name"]
        for info in placement_group_table().values()
        if info["name"].startswith("raylane-") and info["state"] != "REMOVED"
    ]


def assert_released(timeout_s: float = 15.0) -> None:
    """Fail unless all raylane actors and placement groups are gone within ``timeout_s`` (Ray frees them lazily)."""
    deadline = time.monotonic() + timeout_s
    while True:
        actors, groups = live_raylane_actors(), live_raylane_placement_groups()
        if not actors and not groups:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"raylane left behind actors {actors} and placement groups {groups}")
        time.sleep(0.2)


def listening_tcp_ports() -> set[int]:
    """TCP ports some process on this machine listens on (Linux: read from ``/proc/net``)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local_address, state = line.split()[1], line.split()[3]
            if state == "0A":  # TCP_LISTEN
                ports.add(int(local_address.rsplit(":", 1)[1], 16))
    return ports
