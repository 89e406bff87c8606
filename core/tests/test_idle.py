"""Idle warm workers leave when their time is up, or at once when other work in the cluster waits for what they hold.

The rule that decides whether a waiting demand wants what the workers hold is a pure function, checked with
hypothesis; the watch itself runs against a real local Ray, with real pending placement groups and tasks.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.util.placement_group import placement_group, remove_placement_group

from raylane.idle import IdleWatch, wanted_resources
from raylane.testing import ensure_local_ray

RESOURCE_NAMES = st.sampled_from(["CPU", "GPU", "memory", "accelerator_type:A100", "custom"])
DEMANDS = st.lists(st.dictionaries(RESOURCE_NAMES, st.floats(min_value=0, max_value=8), max_size=3), max_size=5)


@settings(max_examples=200, deadline=None)
@given(demands=DEMANDS, held=st.sets(RESOURCE_NAMES))
def test_a_demand_wants_the_workers_only_when_they_hold_everything_it_asks_for(
    demands: list[dict[str, float]], held: set[str]
) -> None:
    wanted = wanted_resources(demands, held)
    assert wanted <= held
    satisfiable = [{name for name, amount in d.items() if amount > 0} for d in demands]
    expected = set().union(*(asked for asked in satisfiable if asked and asked <= held))
    assert wanted == expected


def test_cpu_workers_ignore_a_gpu_demand_and_answer_a_cpu_one() -> None:
    assert wanted_resources([{"GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], {"CPU"}) == set()
    assert wanted_resources([{"GPU": 1.0}, {"CPU": 2.0}], {"CPU"}) == {"CPU"}
    assert wanted_resources([{"CPU": 0.0}], {"CPU"}) == set(), "a zero-CPU actor waits for nothing the workers hold"


@pytest.fixture
def all_cpus_taken() -> Iterator[None]:
    """A local Ray with every CPU reserved, as warm workers would hold them."""
    ensure_local_ray()
    hold = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(hold.ready(), timeout=30)
    yield
    remove_placement_group(hold)


def watch(timeout_s: float, held: set[str]) -> tuple[IdleWatch, queue.Queue[str]]:
    reasons: queue.Queue[str] = queue.Queue()
    idle = IdleWatch(reasons.put, timeout_s, held)
    idle.start()
    return idle, reasons


@pytest.mark.timeout(60)
def test_a_pending_placement_group_releases_idle_cpu_workers_at_once(all_cpus_taken: None) -> None:
    idle, reasons = watch(timeout_s=120, held={"CPU"})
    waiting = placement_group([{"CPU": 1}])
    try:
        started = time.monotonic()
        reason = reasons.get(timeout=20)
        assert "other work waits for CPU" in reason
        assert time.monotonic() - started < 20
    finally:
        idle.cancel()
        remove_placement_group(waiting)


@pytest.mark.timeout(60)
def test_a_pending_task_releases_idle_cpu_workers_at_once(all_cpus_taken: None) -> None:
    idle, reasons = watch(timeout_s=120, held={"CPU"})
    waiting = ray.remote(num_cpus=1)(lambda: None).remote()
    try:
        assert "other work waits for CPU" in reasons.get(timeout=20)
    finally:
        idle.cancel()
        ray.cancel(waiting, force=True)


@pytest.mark.timeout(60)
def test_workers_whose_release_frees_nothing_for_others_wait_out_their_timeout(all_cpus_taken: None) -> None:
    # held is empty for workers inside a placement group someone else owns (a Tune trial's).
    _, reasons = watch(timeout_s=3, held=set())
    waiting = placement_group([{"CPU": 1}])
    try:
        started = time.monotonic()
        assert "idle for 3 s (idle_timeout)" in reasons.get(timeout=20)
        assert time.monotonic() - started >= 2.5
    finally:
        remove_placement_group(waiting)


@pytest.mark.timeout(30)
def test_a_cancelled_watch_never_releases() -> None:
    idle, reasons = watch(timeout_s=1, held=set())
    idle.cancel()
    with pytest.raises(queue.Empty):
        reasons.get(timeout=3)
