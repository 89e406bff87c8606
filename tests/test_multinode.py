"""Multi-node behaviour on Ray's own one-machine cluster utility: node ranks, local ranks, rendezvous, GPUs, results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from raylane import get_strategy, warm_pool
from raylane.group import WorkerGroup
from raylane.options import LaunchOptions
from raylane.registry import backend_host
from raylane.testing import ClassifierModel, assert_released, make_loader, quiet_trainer
from raylane.testing.cluster import local_cluster
from tests.conftest import read_reports

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A driver-only head node plus two worker nodes (2 CPUs and 1 CPU; fake GPUs on the first)."""
    nodes = [{"num_cpus": 2, "num_gpus": 2, "resources": {"big_node": 1}}, {"num_cpus": 1, "num_gpus": 1}]
    with local_cluster(nodes=nodes) as cluster:
        yield cluster


def test_ranks_follow_nodes_with_uneven_workers_per_node(cluster: Cluster, tmp_path: Path) -> None:
    model = ClassifierModel(report_dir=str(tmp_path), report_env=("MASTER_ADDR", "LOCAL_WORLD_SIZE", "NODE_RANK"))
    trainer = quiet_trainer(
        strategy=get_strategy("ddp", workers=3, placement_strategy="PACK"), max_epochs=1, default_root_dir=str(tmp_path)
    )
    trainer.fit(model, make_loader(8, samples=48))

    reports = read_reports(tmp_path)
    assert [r["global_rank"] for r in reports] == [0, 1, 2]
    nodes = [r["node_id"] for r in reports]
    assert len(set(nodes)) == 2, "3 one-CPU workers cannot fit one node here"
    driver_node = ray.get_runtime_context().get_node_id()
    assert driver_node not in nodes, "the head node has no CPUs, so rank 0 runs on another node than the driver"
    for report in reports:
        same_node = [r for r in reports if r["node_id"] == report["node_id"]]
        assert report["local_rank"] == same_node.index(report)
        assert report["node_rank"] == (0 if report["node_id"] == nodes[0] else 1)
        assert report["env"]["LOCAL_WORLD_SIZE"] == str(len(same_node))
        assert report["env"]["NODE_RANK"] == str(report["node_rank"])
        assert report["world_size"] == 3 and report["sampler_replicas"] == 3
    # The checkpoint that rank 0 wrote on its node is on the driver, and it holds the driver's weights.
    best = Path(trainer.checkpoint_callback.best_model_path)
    saved = torch.load(best, weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["layer.weight"], model.layer.weight)
    assert trainer.current_epoch == 1
    trainer.strategy.release_workers()  # warm for a next entry point until then
    assert_released()


def test_gpu_assignment_shares_node_gpus(cluster: Cluster) -> None:
    """Fake GPUs: no CUDA needed, only where Ray put each worker and what it will be told."""
    options = LaunchOptions(workers=3, use_gpu=True, cpus_per_worker=1)
    with WorkerGroup(backend_host("ddp"), options) as group:
        group.start()
        contexts = group.contexts
    by_node: dict[str, list] = {}
    for context in contexts:
        by_node.setdefault(context.placement.node_id, []).append(context)
    assert sorted(len(workers) for workers in by_node.values()) == [1, 2]
    for workers in by_node.values():
        visible = {w.env["CUDA_VISIBLE_DEVICES"] for w in workers}
        assert len(visible) == 1, "workers on one node see the same GPUs (NCCL peer access)"
        gpu_list = visible.pop().split(",")
        assert sorted(gpu_list) == sorted(g for w in workers for g in w.placement.gpu_ids)
        assert sorted(w.device for w in workers) == [f"cuda:{i}" for i in range(len(workers))]
        for worker in workers:
            assert gpu_list[int(worker.device.split(":")[1])] == worker.placement.gpu_ids[0]
    assert_released()


def test_fractional_gpus_share_a_device(cluster: Cluster) -> None:
    options = LaunchOptions(workers=2, use_gpu=True, gpus_per_worker=0.5, resources_per_worker={"big_node": 0.5})
    with WorkerGroup(backend_host("ddp"), options) as group:
        group.start()
        contexts = group.contexts
    assert len({c.placement.node_id for c in contexts}) == 1
    for context in contexts:
        own = context.placement.gpu_ids[0]
        visible = context.env["CUDA_VISIBLE_DEVICES"].split(",")
        assert visible[int(context.device.split(":")[1])] == own
    assert_released()


def test_strict_spread_puts_one_worker_per_node(cluster: Cluster) -> None:
    with WorkerGroup(backend_host("ddp"), LaunchOptions(workers=2, placement_strategy="STRICT_SPREAD")) as group:
        group.start()
        assert len({c.placement.node_id for c in group.contexts}) == 2
        assert {c.master_addr for c in group.contexts} == {group.contexts[0].placement.node_ip}


def test_warm_pool_workers_serve_the_bundles_on_their_own_nodes(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This driver connected to the cluster (which outlives it), so stopped workers leave a pool: 2 on the 2-CPU node
    # and 1 on the other. The next group must claim each on the node its bundle landed on, not anywhere.
    monkeypatch.setenv(warm_pool.SWITCH_ENV, "1")
    options = LaunchOptions(workers=3, placement_strategy="PACK")
    try:
        with WorkerGroup(backend_host("ddp"), options) as first:
            first.start()
            first_nodes = sorted(context.placement.node_id for context in first.contexts)
        _wait_for_pool(len(first_nodes))
        with WorkerGroup(backend_host("ddp"), options) as second:
            second.start()
            assert second.pooled == 3, "every rank was claimed from the pool"
            bundle_nodes = ray.util.placement_group_table(second.reservation.placement_group)["bundles_to_node_id"]
            for index, context in zip(second.reservation.bundle_indices, second.contexts, strict=True):
                assert context.placement.node_id == bundle_nodes[index], "claimed on its bundle's node"
            assert sorted(context.placement.node_id for context in second.contexts) == first_nodes
    finally:
        for name in warm_pool.pool_names():
            ray.kill(ray.get_actor(name, namespace=warm_pool.NAMESPACE))
    assert_released()


def _wait_for_pool(count: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(warm_pool.pool_names()) < count:
        assert time.monotonic() < deadline, f"the stopped group left {len(warm_pool.pool_names())} of {count}"
        time.sleep(0.2)
