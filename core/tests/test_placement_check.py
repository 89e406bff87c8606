"""A request the cluster can never hold fails at once, saying what was asked and what exists; others go on to wait.

``check_can_ever_fit`` is a pure function of the bundles, the strategy and each node's total resources (as
``ray.nodes()`` reports them), so no Ray is started here.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raylane import ResourceError
from raylane.placement import check_can_ever_fit

property_test = settings(max_examples=100, deadline=None)

CPU_NODE = {"CPU": 8.0, "memory": 3.2e10, "object_store_memory": 1e10, "node:10.0.0.1": 1.0}


def test_gpus_asked_of_a_cpu_only_cluster_say_so_and_list_what_the_cluster_has() -> None:
    with pytest.raises(ResourceError) as raised:
        check_can_ever_fit([{"CPU": 1.0, "GPU": 1.0}] * 2, "PACK", [CPU_NODE, CPU_NODE])

    message = str(raised.value)
    assert message.startswith("The cluster has no GPU resources.")
    assert "Asked for 2 worker(s) x {CPU: 1, GPU: 1} (placement PACK), {CPU: 2, GPU: 2} in all" in message
    assert "the cluster has {CPU: 16} on 2 node(s) [{CPU: 8}; {CPU: 8}]" in message
    assert "use_gpu=False" in message


def test_a_custom_resource_no_node_has_is_named() -> None:
    with pytest.raises(ResourceError, match="The cluster has no TPU resources"):
        check_can_ever_fit([{"CPU": 1.0, "TPU": 1.0}], "PACK", [CPU_NODE])


def test_more_than_the_whole_cluster_fails() -> None:
    with pytest.raises(ResourceError, match="more CPU than the whole cluster has") as raised:
        check_can_ever_fit([{"CPU": 4.0}] * 5, "SPREAD", [CPU_NODE, CPU_NODE])

    assert "{CPU: 20} in all; the cluster has {CPU: 16} on 2 node(s)" in str(raised.value)


def test_one_worker_larger_than_every_node_fails_even_when_the_total_fits() -> None:
    with pytest.raises(ResourceError, match="One worker's resources exceed every single node"):
        check_can_ever_fit([{"CPU": 10.0}], "PACK", [CPU_NODE, CPU_NODE])


def test_a_worker_needing_cpu_and_gpu_together_must_find_both_on_one_node() -> None:
    nodes = [{"CPU": 8.0}, {"CPU": 1.0, "GPU": 4.0}]

    with pytest.raises(ResourceError, match="exceed every single node"):
        check_can_ever_fit([{"CPU": 2.0, "GPU": 1.0}], "PACK", nodes)


def test_strict_pack_needs_one_node_holding_every_worker() -> None:
    with pytest.raises(ResourceError, match="STRICT_PACK needs all workers on one node"):
        check_can_ever_fit([{"CPU": 6.0}] * 2, "STRICT_PACK", [CPU_NODE, CPU_NODE])


def test_strict_spread_needs_a_node_per_worker() -> None:
    with pytest.raises(ResourceError, match="STRICT_SPREAD needs one node per worker but the cluster has 2"):
        check_can_ever_fit([{"CPU": 1.0}] * 3, "STRICT_SPREAD", [CPU_NODE, CPU_NODE])


@pytest.mark.parametrize(
    ("bundles", "strategy", "nodes"),
    [
        ([{"CPU": 4.0}] * 2, "PACK", [CPU_NODE]),
        ([{"CPU": 4.0}] * 4, "SPREAD", [CPU_NODE, CPU_NODE]),
        ([{"CPU": 4.0}] * 2, "STRICT_PACK", [CPU_NODE, CPU_NODE]),
        ([{"CPU": 8.0}] * 2, "STRICT_SPREAD", [CPU_NODE, CPU_NODE]),
        ([{"CPU": 1.0, "GPU": 0.1}] * 10, "STRICT_PACK", [{"CPU": 16.0, "GPU": 1.0}]),  # sums to 0.999...
        ([{"CPU": 1.0, "GPU": 1 / 3}] * 3, "PACK", [{"CPU": 4.0, "GPU": 1.0}]),
    ],
)
def test_layouts_the_cluster_can_hold_pass(
    bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]
) -> None:
    check_can_ever_fit(bundles, strategy, nodes)


RESOURCES = ("CPU", "GPU", "TPU")
node_resources = st.dictionaries(st.sampled_from(RESOURCES), st.integers(1, 16).map(float), min_size=1).map(
    lambda node: {"CPU": 1.0, **node}
)  # every Ray node has CPUs
clusters = st.lists(node_resources, min_size=1, max_size=4)


@st.composite
def bundle_fitting(draw: st.DrawFn, nodes: list[dict[str, float]]) -> dict[str, float]:
    """A bundle that fits on one of ``nodes``: a part of each resource of one node."""
    node = draw(st.sampled_from(nodes))
    bundle = {name: draw(st.floats(0.0, 1.0)) * amount for name, amount in node.items()}
    return {name: amount for name, amount in bundle.items() if amount > 0} or {"CPU": min(1.0, node["CPU"])}


def fitting_in_total(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """The longest first part of ``bundles`` whose totals the cluster holds (at least one bundle: each fits a node)."""
    totals = {name: sum(node.get(name, 0.0) for node in nodes) for name in RESOURCES}
    kept: list[dict[str, float]] = []
    for bundle in bundles:
        candidate = [*kept, bundle]
        if kept and any(sum(b.get(name, 0.0) for b in candidate) > totals[name] for name in RESOURCES):
            break
        kept = candidate
    return kept


layouts = clusters.flatmap(
    lambda nodes: st.tuples(st.just(nodes), st.lists(bundle_fitting(nodes), min_size=1, max_size=8))
)


@property_test
@given(layouts, st.sampled_from(["PACK", "SPREAD"]))
def test_bundles_that_each_fit_a_node_and_fit_in_total_pass(
    layout: tuple[list[dict[str, float]], list[dict[str, float]]], strategy: str
) -> None:
    # Only the check's contract: it rules out what can never fit; Ray's bin packing decides the rest.
    nodes, drawn = layout
    bundles = fitting_in_total(drawn, nodes)

    check_can_ever_fit(bundles, strategy, nodes)


@property_test
@given(clusters, st.sampled_from(RESOURCES), st.integers(1, 8), st.sampled_from(["PACK", "SPREAD", "STRICT_PACK"]))
def test_asking_more_of_a_resource_than_the_cluster_has_always_fails(
    nodes: list[dict[str, float]], resource: str, workers: int, strategy: str
) -> None:
    total = sum(node.get(resource, 0.0) for node in nodes)
    per_worker = total / workers + 0.5

    with pytest.raises(ResourceError, match=f"(no {resource} resources|more {resource} than the whole cluster)"):
        check_can_ever_fit([{resource: per_worker}] * workers, strategy, nodes)
