"""The Ray calls outside Ray's public API (raylane._ray) still answer. If a Ray release moves them, raylane keeps
working (warm workers then wait out idle_timeout; the start-up line omits the dashboard), and this test says what
to fix."""

from __future__ import annotations

import time

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from raylane import _ray
from raylane.testing import ensure_local_ray


@pytest.mark.timeout(60)
def test_waiting_work_lists_a_pending_placement_group_and_each_nodes_free_resources() -> None:
    ensure_local_ray()
    waiting = _ray.waiting_work()
    assert waiting is not None, "Ray no longer answers ray.autoscaler.v2.sdk.get_cluster_status"
    node = ray.get_runtime_context().get_node_id()
    assert 0 <= waiting.free[node]["CPU"] <= ray.cluster_resources()["CPU"], waiting.free
    too_big = {"CPU": ray.cluster_resources()["CPU"] + 1}
    pending = placement_group([too_big])
    try:
        deadline = time.monotonic() + 20
        while too_big not in getattr(_ray.waiting_work(), "demands", []):
            assert time.monotonic() < deadline, f"a pending placement group never showed: {_ray.waiting_work()}"
            time.sleep(0.2)
    finally:
        remove_placement_group(pending)


@pytest.mark.timeout(60)
def test_dashboard_url_is_an_address_or_none() -> None:
    ensure_local_ray()  # started without a dashboard
    url = _ray.dashboard_url()
    assert url is None or url.startswith("http"), url
