"""Ranks and devices for every layout Ray can produce: nodes sharing an IP, GPUs shared by fractional workers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raylane.topology import DeviceAssignment, WorkerPlacement, assign_devices, assign_ranks

NODE_IDS = ("node-a", "node-b", "node-c", "node-d")
# Fewer IPs than nodes, so several Ray nodes share one IP (containers, Ray's multi-node test cluster).
NODE_IPS = ("10.0.0.1", "10.0.0.2")
# Up to 11, so that "10" sorts after "2" only when ids are compared as numbers.
GPU_IDS = tuple(str(i) for i in range(12))

# No deadline: the machine running the suite may be busy; fewer examples keep the whole suite fast.
property_test = settings(max_examples=50, deadline=None)


@st.composite
def layouts(draw: st.DrawFn, *, with_gpus: bool) -> list[WorkerPlacement]:
    """Workers in bundle (rank) order, each on one of a few nodes; with GPUs, each gets ids from its node's GPUs.

    Node GPU pools are small, so workers on one node often get the same id: fractional-GPU sharing.
    """
    ip_of = {node: draw(st.sampled_from(NODE_IPS)) for node in NODE_IDS}
    pool_of = {node: draw(st.lists(st.sampled_from(GPU_IDS), min_size=1, max_size=4, unique=True)) for node in NODE_IDS}
    nodes = draw(st.lists(st.sampled_from(NODE_IDS), min_size=1, max_size=12))
    placements = []
    for node in nodes:
        gpu_ids: tuple[str, ...] = ()
        if with_gpus:
            gpu_ids = tuple(draw(st.lists(st.sampled_from(pool_of[node]), min_size=1, max_size=2, unique=True)))
        placements.append(WorkerPlacement(node_id=node, node_ip=ip_of[node], gpu_ids=gpu_ids))
    return placements


def numeric_order(gpu_ids: set[str]) -> list[str]:
    return sorted(gpu_ids, key=int)


def device_index(assignment: DeviceAssignment) -> int:
    kind, _, index = assignment.device.partition(":")
    assert kind == "cuda"
    return int(index)


@property_test
@given(layouts(with_gpus=False))
def test_global_ranks_follow_bundle_order_and_world_size_is_the_worker_count(placements: list[WorkerPlacement]) -> None:
    ranks = assign_ranks(placements)

    assert [r.global_rank for r in ranks] == list(range(len(placements)))
    assert {r.world_size for r in ranks} == {len(placements)}


@property_test
@given(layouts(with_gpus=False))
def test_node_ranks_number_nodes_by_first_appearance(placements: list[WorkerPlacement]) -> None:
    ranks = assign_ranks(placements)
    distinct_nodes = len({p.node_id for p in placements})

    assert ranks[0].node_rank == 0
    assert {r.node_rank for r in ranks} == set(range(distinct_nodes))
    assert {r.num_nodes for r in ranks} == {distinct_nodes}
    highest_seen = -1
    for rank in ranks:  # a node rank is either one already seen or the next number
        assert rank.node_rank <= highest_seen + 1
        highest_seen = max(highest_seen, rank.node_rank)


@property_test
@given(layouts(with_gpus=False))
def test_workers_are_grouped_by_node_id_even_when_nodes_share_an_ip(placements: list[WorkerPlacement]) -> None:
    ranks = assign_ranks(placements)

    for a, rank_a in zip(placements, ranks):
        for b, rank_b in zip(placements, ranks):
            assert (rank_a.node_rank == rank_b.node_rank) == (a.node_id == b.node_id)


@property_test
@given(layouts(with_gpus=False))
def test_local_ranks_count_each_nodes_workers_in_rank_order(placements: list[WorkerPlacement]) -> None:
    ranks = assign_ranks(placements)

    for node in {p.node_id for p in placements}:
        on_node = [r for p, r in zip(placements, ranks) if p.node_id == node]
        assert [r.local_rank for r in on_node] == list(range(len(on_node)))
        assert {r.local_world_size for r in on_node} == {len(on_node)}
    assert sum(r.local_rank == 0 for r in ranks) == ranks[0].num_nodes


@property_test
@given(layouts(with_gpus=True))
def test_every_worker_on_a_node_sees_all_of_the_nodes_gpus_in_numeric_order(placements: list[WorkerPlacement]) -> None:
    assignments = assign_devices(placements, use_gpu=True)

    assert len(assignments) == len(placements)
    for placement, assignment in zip(placements, assignments):
        node_gpus = {gpu for p in placements if p.node_id == placement.node_id for gpu in p.gpu_ids}
        assert assignment.cuda_visible_devices == ",".join(numeric_order(node_gpus))


@property_test
@given(layouts(with_gpus=True))
def test_each_worker_trains_on_its_own_first_gpu(placements: list[WorkerPlacement]) -> None:
    assignments = assign_devices(placements, use_gpu=True)

    for placement, assignment in zip(placements, assignments):
        assert assignment.cuda_visible_devices is not None
        visible = assignment.cuda_visible_devices.split(",")
        assert visible[device_index(assignment)] == numeric_order(set(placement.gpu_ids))[0]


@property_test
@given(layouts(with_gpus=True))
def test_workers_on_one_node_share_a_device_only_when_ray_gave_them_the_same_gpu(
    placements: list[WorkerPlacement],
) -> None:
    assignments = assign_devices(placements, use_gpu=True)

    for a, device_a in zip(placements, assignments):
        for b, device_b in zip(placements, assignments):
            if a.node_id == b.node_id:
                same_gpu = numeric_order(set(a.gpu_ids))[0] == numeric_order(set(b.gpu_ids))[0]
                assert (device_a.device == device_b.device) == same_gpu


@property_test
@given(layouts(with_gpus=True))
def test_cpu_mode_ignores_gpu_ids_and_hides_no_devices(placements: list[WorkerPlacement]) -> None:
    assert assign_devices(placements, use_gpu=False) == [DeviceAssignment(device="cpu")] * len(placements)


@property_test
@given(layouts(with_gpus=True), st.data())
def test_a_gpu_worker_without_gpu_ids_is_an_error(placements: list[WorkerPlacement], data: st.DataObject) -> None:
    victim = data.draw(st.integers(0, len(placements) - 1))
    placements[victim] = WorkerPlacement(placements[victim].node_id, placements[victim].node_ip, gpu_ids=())

    with pytest.raises(ValueError, match="use_gpu=True but Ray assigned no GPU"):
        assign_devices(placements, use_gpu=True)


def test_two_nodes_of_two_workers_with_ray_giving_gpus_in_either_order() -> None:
    placements = [
        WorkerPlacement("node-a", "10.0.0.1", ("0",)),
        WorkerPlacement("node-a", "10.0.0.1", ("1",)),
        WorkerPlacement("node-b", "10.0.0.2", ("1",)),
        WorkerPlacement("node-b", "10.0.0.2", ("0",)),
    ]

    ranks = assign_ranks(placements)
    devices = assign_devices(placements, use_gpu=True)

    assert [(r.global_rank, r.node_rank, r.local_rank) for r in ranks] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert {(r.world_size, r.local_world_size, r.num_nodes) for r in ranks} == {(4, 2, 2)}
    assert devices == [
        DeviceAssignment("cuda:0", "0,1"),
        DeviceAssignment("cuda:1", "0,1"),
        DeviceAssignment("cuda:1", "0,1"),
        DeviceAssignment("cuda:0", "0,1"),
    ]


def test_interleaved_nodes_on_one_ip_are_two_nodes() -> None:
    placements = [WorkerPlacement(node, "127.0.0.1") for node in ("node-a", "node-b", "node-a", "node-b", "node-b")]

    ranks = assign_ranks(placements)

    assert [(r.node_rank, r.local_rank, r.local_world_size) for r in ranks] == [
        (0, 0, 2),
        (1, 0, 3),
        (0, 1, 2),
        (1, 1, 3),
        (1, 2, 3),
    ]
    assert {r.num_nodes for r in ranks} == {2}


def test_workers_sharing_a_fractional_gpu_train_on_the_same_device() -> None:
    placements = [
        WorkerPlacement("node-a", "10.0.0.1", ("3",)),
        WorkerPlacement("node-a", "10.0.0.1", ("3",)),
        WorkerPlacement("node-a", "10.0.0.1", ("5",)),
    ]

    assert assign_devices(placements, use_gpu=True) == [
        DeviceAssignment("cuda:0", "3,5"),
        DeviceAssignment("cuda:0", "3,5"),
        DeviceAssignment("cuda:1", "3,5"),
    ]


def test_gpu_ids_sort_as_numbers_and_uuids_after_them() -> None:
    numeric = [WorkerPlacement("n", "10.0.0.1", ("10",)), WorkerPlacement("n", "10.0.0.1", ("2",))]
    uuids = [WorkerPlacement("n", "10.0.0.1", ("GPU-b2",)), WorkerPlacement("n", "10.0.0.1", ("GPU-a1",))]

    assert assign_devices(numeric, use_gpu=True) == [
        DeviceAssignment("cuda:1", "2,10"),
        DeviceAssignment("cuda:0", "2,10"),
    ]
    assert assign_devices(uuids, use_gpu=True) == [
        DeviceAssignment("cuda:1", "GPU-a1,GPU-b2"),
        DeviceAssignment("cuda:0", "GPU-a1,GPU-b2"),
    ]


def test_a_worker_with_several_gpus_trains_on_its_lowest_and_sees_them_all() -> None:
    placements = [WorkerPlacement("n", "10.0.0.1", ("7", "6")), WorkerPlacement("n", "10.0.0.1", ("1", "0"))]

    assert assign_devices(placements, use_gpu=True) == [
        DeviceAssignment("cuda:2", "0,1,6,7"),
        DeviceAssignment("cuda:0", "0,1,6,7"),
    ]
