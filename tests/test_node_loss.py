"""A node lost mid-fit, on Ray's one-machine cluster utility: the driver names the rank and node, nothing hangs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import ray
from ray.cluster_utils import Cluster

from raylane import WorkerError, get_strategy
from raylane.testing import ClassifierModel, assert_released, make_loader, worker_pid

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A driver-only head and two one-CPU worker nodes, one of which the test takes away."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _remove_node_of_rank(cluster: Cluster, rank: int, removed: list[str]) -> None:
    worker_pid(rank)  # the worker is up and its entry point running
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(f"-{rank}")]
    node_id = ray.get(ray.get_actor(name).describe.remote(), timeout=30).node_id
    [node] = [node for node in cluster.worker_nodes if node.node_id == node_id]
    removed.append(node.node_ip_address)
    cluster.remove_node(node, allow_graceful=False)


def test_lost_node_fails_the_fit_naming_rank_and_node(cluster: Cluster, tmp_path: Path) -> None:
    victim = 1
    removed: list[str] = []
    remover = threading.Thread(target=_remove_node_of_rank, args=(cluster, victim, removed), daemon=True)
    model = ClassifierModel(fail_on_rank=0, fail_at_step=1, fail_mode="hang")  # rank 0 keeps the fit running
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=2, placement_strategy="STRICT_SPREAD"),
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    remover.start()
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:
        trainer.fit(model, make_loader(8))
    assert time.monotonic() - started < 90, "the default heartbeat_timeout (30 s) bounds the wait"
    remover.join(timeout=30)
    assert info.value.rank == victim
    assert removed and info.value.node_ip == removed[0]
    assert_released()
