"""A node lost mid-fit, on Ray's one-machine cluster utility: the driver names the rank and node, nothing hangs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import ray
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from ray.cluster_utils import Cluster

from raylane import WorkerError, get_strategy
from raylane.testing import ClassifierModel, assert_released, make_loader, quiet_trainer, weight_fingerprint, worker_pid
from raylane.testing.cluster import local_cluster
from raylane.testing.faults import wait_for_file
from raylane.testing.s3 import S3Server

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A driver-only head and two one-CPU worker nodes, one of which the test takes away."""
    with local_cluster(nodes=[{"num_cpus": 1}, {"num_cpus": 1}]) as cluster:
        yield cluster


def _remove_node_of_rank(
    cluster: Cluster, rank: int, removed: list[str], after: Path | None = None, removed_at: list[float] | None = None
) -> None:
    if after is not None:
        wait_for_file(after)  # training has started (a marker the model writes), not only the worker process
    worker_pid(rank)  # the worker is up and its entry point running
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(f"-{rank}")]
    node_id = ray.get(ray.get_actor(name).describe.remote(), timeout=30).node_id
    [node] = [node for node in cluster.worker_nodes if node.node_id == node_id]
    removed.append(node.node_ip_address)
    if removed_at is not None:
        removed_at.append(time.monotonic())  # when the node starts going away
    cluster.remove_node(node, allow_graceful=False)


def test_lost_node_fails_the_fit_naming_rank_and_node(cluster: Cluster, tmp_path: Path) -> None:
    victim = 1
    removed: list[str] = []
    removed_at: list[float] = []
    stalled = tmp_path / "rank0-stalled"  # written by rank 0 as it stalls: training is under way
    remover = threading.Thread(
        target=_remove_node_of_rank,
        args=(cluster, victim, removed),
        kwargs={"after": stalled, "removed_at": removed_at},
        daemon=True,
    )
    # Rank 0 keeps the fit running (alive, in training_step) while rank 1 waits for it in a collective.
    model = ClassifierModel(fail_on_rank=0, fail_at_step=1, fail_mode="hang", fail_once_marker=str(stalled))
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=2, placement_strategy="STRICT_SPREAD"),
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    remover.start()
    with pytest.raises(WorkerError) as info:
        trainer.fit(model, make_loader(8))
    failed_at = time.monotonic()
    remover.join(timeout=30)
    # Measured from the node's removal, not from fit's start (start-up time on a loaded machine is not the point):
    # the default heartbeat_timeout (30 s) plus 30 s for Ray to notice and the driver to release everything.
    assert removed_at and failed_at - removed_at[0] < 60, "the default heartbeat_timeout (30 s) bounds the wait"
    assert info.value.rank == victim
    assert removed and info.value.node_ip == removed[0]
    assert_released()


def test_rank_zero_restarted_on_another_node_resumes_from_the_bucket(
    cluster: Cluster, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Rank 0's node is lost after a checkpoint went to S3: the fit restarts on the other node from the URL. The
    driver (on the head node) cannot see rank 0's files, and nothing is copied to it: URLs are not files."""
    bucket = s3_server.create_bucket()
    monkeypatch.chdir(tmp_path)  # the driver's working directory, where a copy back would land
    hung, reports = tmp_path / "hung-once", tmp_path / "reports"
    reports.mkdir()
    # One worker, 2 steps per epoch: rank 0 hangs (alive, answering Ray) at the first step of epoch 2, once.
    model = ClassifierModel(
        fail_on_rank=0, fail_at_step=2, fail_mode="hang", fail_once_marker=str(hung), report_dir=str(reports)
    )
    removed: list[str] = []

    def remove_rank_zero_node() -> None:
        # Once rank 0 hangs and the driver knows its checkpoint (rank 0's messages reach the driver by polling).
        deadline = time.monotonic() + 120
        while not (hung.exists() and trainer.strategy.launcher.last_checkpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        _remove_node_of_rank(cluster, 0, removed)

    remover = threading.Thread(target=remove_rank_zero_node, daemon=True)
    trainer = quiet_trainer(
        strategy=get_strategy("ddp", workers=1, env=s3_server.env(), max_failures=1, heartbeat_timeout=5),
        max_epochs=2,
        callbacks=[ModelCheckpoint(dirpath=f"s3://{bucket}/ckpt", save_top_k=-1, every_n_epochs=1)],
    )
    remover.start()
    with caplog.at_level(logging.WARNING, logger="raylane"):
        trainer.fit(model, make_loader(8, samples=16))
    remover.join(timeout=30)
    assert removed, "rank 0's node was removed"
    checkpoint = f"s3://{bucket}/ckpt/epoch=0-step=2.ckpt"
    assert any(f"restarting fit from {checkpoint}" in record.getMessage() for record in caplog.records)
    report = json.loads((reports / "fit-rank0.json").read_text())  # the restarted rank 0's
    assert report["node_id"] in [node.node_id for node in cluster.worker_nodes], "it ran on the remaining node"
    with s3_server.filesystem().open(checkpoint, "rb") as saved:
        weights = torch.load(saved, weights_only=False)["state_dict"]["layer.weight"]
    assert report["initial_weight_fingerprint"] == pytest.approx(weight_fingerprint(weights))
    assert trainer.current_epoch == 2
    assert trainer.checkpoint_callback.best_model_path.startswith(f"s3://{bucket}/ckpt/epoch=1-")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hung-once", "reports"], "nothing was copied back"
    trainer.strategy.release_workers()
    assert_released()
