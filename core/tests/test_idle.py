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

from raylane import _ray
from raylane.idle import IdleWatch, helped_by_release
from raylane.placement import fits
from raylane.testing import ensure_local_ray

RESOURCE_NAMES = st.sampled_from(["CPU", "GPU", "accelerator_type:A100", "custom"])
RESOURCES = st.dictionaries(RESOURCE_NAMES, st.integers(min_value=0, max_value=8).map(float), max_size=3)
NODES = st.dictionaries(st.sampled_from(["node-a", "node-b", "node-c"]), RESOURCES, max_size=3)


def after_release(free: dict[str, dict[str, float]], held: dict[str, dict[str, float]]) -> list[dict[str, float]]:
    """Each node's free resources once the workers' holdings return to it."""
    nodes = free.keys() | held.keys()
    return [
        {
            name: free.get(n, {}).get(name, 0) + held.get(n, {}).get(name, 0)
            for name in {*free.get(n, {}), *held.get(n, {})}
        }
        for n in nodes
    ]


@settings(max_examples=300, deadline=None)
@given(demands=st.lists(RESOURCES, max_size=5), free=NODES, held=NODES, more=NODES)
def test_a_demand_counts_when_it_waits_now_and_would_run_after_the_release(
    demands: list[dict[str, float]],
    free: dict[str, dict[str, float]],
    held: dict[str, dict[str, float]],
    more: dict[str, dict[str, float]],
) -> None:
    def asked(demand: dict[str, float]) -> set[str]:
        return {name for name, amount in demand.items() if amount > 0}

    helped = [
        demand
        for demand in demands
        if asked(demand)
        and not any(fits(demand, resources) for resources in free.values())
        and any(fits(demand, resources) for resources in after_release(free, held))
    ]
    wanted = helped_by_release(demands, free, held)
    assert wanted == set().union(*map(asked, helped))
    assert not helped_by_release(demands, free, {}), "workers that hold nothing free nothing"
    holding_more = {node: {**more.get(node, {}), **held.get(node, {})} for node in held.keys() | more.keys()}
    assert wanted <= helped_by_release(demands, free, holding_more), "holding more never makes the workers stay"


def test_cpu_workers_answer_a_cpu_demand_but_not_a_gpu_or_an_impossible_one() -> None:
    free = {"a": {"CPU": 0.0, "GPU": 0.0}, "b": {"CPU": 1.0}}
    held = {"a": {"CPU": 2.0}}
    assert helped_by_release([{"CPU": 2.0}], free, held) == {"CPU"}
    assert helped_by_release([{"GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], free, held) == set()
    assert helped_by_release([{"CPU": 3.0}], free, held) == set(), "no node could hold it, with or without them"
    assert helped_by_release([{"CPU": 1.0}], free, held) == set(), "it fits on node b already"
    assert helped_by_release([{"CPU": 0.0}], free, held) == set(), "a zero-CPU actor waits for nothing they hold"
    assert helped_by_release([{"CPU": 2.0, "GPU": 1.0}], {"a": {"GPU": 1.0}}, held) == {"CPU", "GPU"}


@pytest.fixture
def all_cpus_taken() -> Iterator[None]:
    """A local Ray with every CPU reserved, as warm workers would hold them."""
    ensure_local_ray()
    hold = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(hold.ready(), timeout=30)
    # Ray's report lags its state by up to a second: until it shows the CPUs taken and no demand waiting (an earlier
    # test's cancelled task or removed group may still show), a watch would act on an old picture.
    deadline = time.monotonic() + 30
    while not _reports_every_cpu_taken_and_nothing_waiting():
        assert time.monotonic() < deadline, f"Ray's report never caught up: {_ray.waiting_work()}"
        time.sleep(0.2)
    yield
    remove_placement_group(hold)


def _reports_every_cpu_taken_and_nothing_waiting() -> bool:
    waiting = _ray.waiting_work()
    return waiting is not None and not waiting.demands and all(not free.get("CPU") for free in waiting.free.values())


def this_node_holds(resources: dict[str, float]) -> dict[str, dict[str, float]]:
    return {ray.get_runtime_context().get_node_id(): resources}


def watch(timeout_s: float, held: dict[str, dict[str, float]]) -> tuple[IdleWatch, queue.Queue[str]]:
    reasons: queue.Queue[str] = queue.Queue()
    idle = IdleWatch(reasons.put, timeout_s, held)
    idle.start()
    return idle, reasons


@pytest.mark.timeout(60)
def test_a_pending_placement_group_releases_idle_cpu_workers_at_once(all_cpus_taken: None) -> None:
    idle, reasons = watch(timeout_s=120, held=this_node_holds({"CPU": 1.0}))
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
    idle, reasons = watch(timeout_s=120, held=this_node_holds({"CPU": 1.0}))
    waiting = ray.remote(num_cpus=1)(lambda: None).remote()
    try:
        assert "other work waits for CPU" in reasons.get(timeout=20)
    finally:
        idle.cancel()
        ray.cancel(waiting, force=True)


@pytest.mark.timeout(60)
def test_a_demand_no_node_could_hold_leaves_idle_workers_alone(all_cpus_taken: None) -> None:
    _, reasons = watch(timeout_s=3, held=this_node_holds({"CPU": 1.0}))
    impossible = placement_group([{"CPU": ray.cluster_resources()["CPU"] + 1}])  # waits for an autoscaler, forever
    try:
        assert "idle for 3 s (idle_timeout)" in reasons.get(timeout=20)
    finally:
        remove_placement_group(impossible)


@pytest.mark.timeout(60)
def test_workers_whose_release_frees_nothing_for_others_wait_out_their_timeout(all_cpus_taken: None) -> None:
    # held is empty for workers inside a placement group someone else owns (a Tune trial's).
    _, reasons = watch(timeout_s=3, held={})
    waiting = placement_group([{"CPU": 1}])
    try:
        started = time.monotonic()
        assert "idle for 3 s (idle_timeout)" in reasons.get(timeout=20)
        assert time.monotonic() - started >= 2.5
    finally:
        remove_placement_group(waiting)


@pytest.mark.timeout(30)
def test_a_cancelled_watch_never_releases() -> None:
    idle, reasons = watch(timeout_s=1, held={})
    idle.cancel()
    with pytest.raises(queue.Empty):
        reasons.get(timeout=3)
