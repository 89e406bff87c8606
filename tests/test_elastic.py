"""Elastic worker counts, ``workers=(min, max)``: a fit that starts with what fits, grows when a node joins, shrinks
when one is lost, and ends with the right epoch and step counts, on Ray's multi-node cluster utility, with its
checkpoints in a real S3-compatible bucket (every resize and restart resumes from there)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from pytorch_lightning.callbacks import ModelCheckpoint
from ray.cluster_utils import Cluster

from raylane import ConfigurationError, elastic, get_strategy, hookimpl
from raylane.elastic import workers_that_fit
from raylane.host import BackendHost
from raylane.options import LaunchOptions
from raylane.registry import backend_host, discover
from raylane.testing import ClassifierModel, assert_released, make_loader, quiet_trainer
from raylane.testing.cluster import local_cluster
from raylane.testing.faults import wait_for_file
from raylane.testing.s3 import S3Server

pytestmark = pytest.mark.timeout(300)

BASE_LR = 0.05
SAMPLES, BATCH = 16, 4  # 4 steps per epoch on one worker, 2 on two


class ElasticModel(ClassifierModel):
    """Slow steps (so the cluster can change mid-fit), rank 0's record of every epoch it ends, and a learning rate
    scaled with the world size in ``on_train_start``, where the docs say to (after a resumed optimizer's state)."""

    def __init__(self, directory: str, step_s: float = 0.2) -> None:
        super().__init__(lr=BASE_LR)
        self.directory = directory
        self.step_s = step_s
        self.first_epoch = 0

    def _path(self, name: str) -> Path:
        return Path(self.directory) / name

    def on_train_start(self) -> None:
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = BASE_LR * self.trainer.world_size
        self.first_epoch = self.current_epoch
        if self.trainer.world_size == 1:
            self._path("started-alone").touch()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        world = self.trainer.world_size
        if world == 1 and not self._path("rank1-hung").exists():
            # Alone on the first node until the test adds a second and the driver, seeing room, asks to grow.
            wait_for_file(self._path("node-added"))
            deadline = time.monotonic() + 120
            while not elastic.resize_requested() and time.monotonic() < deadline:
                time.sleep(0.05)
        if world == 2 and self.global_rank == 1 and self.current_epoch > self.first_epoch:
            hung = self._path("rank1-hung")
            if not hung.exists():  # once: the test then takes this rank's node away
                hung.write_text(ray.get_runtime_context().get_node_id())
                time.sleep(3600)
        time.sleep(self.step_s)
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        if self.global_rank == 0:
            record = {
                "epoch": self.current_epoch,
                "world_size": self.trainer.world_size,
                "global_step": self.global_step,
                "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            }
            with self._path("epochs.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A driver-only head and one one-CPU worker node; the test adds a second and takes one away."""
    with local_cluster(nodes=[{"num_cpus": 1}]) as cluster:
        yield cluster


def test_a_fit_starts_with_what_fits_grows_when_a_node_joins_and_shrinks_when_one_is_lost(
    cluster: Cluster, s3_server: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    max_epochs = 5
    checkpoints = f"s3://{s3_server.create_bucket()}/ckpt"
    strategy = get_strategy(
        "ddp", workers=(1, 2), env=s3_server.env(), max_failures=1, heartbeat_timeout=5, grow_after_s=1
    )
    trainer = quiet_trainer(
        strategy=strategy,
        max_epochs=max_epochs,
        callbacks=[ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1)],
    )
    failures: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit(ElasticModel(str(tmp_path)), make_loader(BATCH, samples=SAMPLES))
        except BaseException as failure:
            failures.append(failure)

    # The fit runs on a thread: Ray adds nodes from the main thread only.
    fitting = threading.Thread(target=fit, daemon=True)
    with caplog.at_level(logging.WARNING, logger="raylane"):
        fitting.start()
        wait_for_file(tmp_path / "started-alone")  # only min fitted: the fit runs on one worker
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        (tmp_path / "node-added").touch()
        wait_for_file(tmp_path / "rank1-hung", timeout_s=180)  # grown to two, and rank 1 is mid-epoch
        node_id = (tmp_path / "rank1-hung").read_text()
        [node] = [node for node in cluster.worker_nodes if node.node_id == node_id]
        cluster.remove_node(node, allow_graceful=False)
        fitting.join(timeout=200)
    assert not fitting.is_alive() and not failures, failures

    messages = [record.getMessage() for record in caplog.records]
    grew = [m for m in messages if "grow_after_s" in m and "world size 1 -> 2" in m]
    shrank = [m for m in messages if "failed; restarting fit from" in m and "world size 2 -> 1" in m]
    assert len(grew) == 1 and len(shrank) == 1, messages
    assert not [m for m in messages if "no longer fit" in m], "each attempt was sized to what fitted"
    assert f"restarting fit from {checkpoints}/raylane-resize-epoch=" in grew[0], "grown from the stop's checkpoint"
    assert f"restarting fit from {checkpoints}/epoch=" in shrank[0], "restarted from the newest epoch's checkpoint"
    saved = s3_server.filesystem().ls(checkpoints.removeprefix("s3://"))
    assert any("raylane-resize-epoch=" in path for path in saved), saved

    # The last record of each epoch is the one that stands (a restart trains the failed epoch again).
    lines = (tmp_path / "epochs.jsonl").read_text().splitlines()
    epochs = {record["epoch"]: record for record in map(json.loads, lines)}
    assert sorted(epochs) == list(range(max_epochs))
    sizes = [epochs[epoch]["world_size"] for epoch in range(max_epochs)]
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1, sizes
    steps = 0
    for epoch in range(max_epochs):
        steps += math.ceil(math.ceil(SAMPLES / sizes[epoch]) / BATCH)
        assert epochs[epoch]["global_step"] == steps, (epoch, epochs)
        assert epochs[epoch]["lr"] == pytest.approx(BASE_LR * sizes[epoch])
    assert trainer.current_epoch == max_epochs
    assert trainer.global_step == steps
    assert trainer.strategy.num_workers == 1, "the driver's strategy shows the last run's world size"
    trainer.strategy.release_workers()
    assert_released()


# -- which backends may change their worker count, and how the core sizes a run ------------------------------------


@pytest.mark.parametrize("backend", ["ddp", "sharded", "horovod", "fsdp"])
def test_backends_whose_checkpoints_load_on_any_world_size_say_so(backend: str) -> None:
    if backend not in discover():  # the integration session installs every backend; a dev environment may not
        pytest.skip(f"raylane-{backend} is not installed here")
    host = backend_host(backend)
    assert host.resumes_on_any_world_size(LaunchOptions(workers=(1, 2)), {}) is True


def test_deepspeed_refuses_a_worker_range_before_any_actor_starts() -> None:
    """DeepSpeed's ZeRO checkpoints hold each rank's partition; loading them on another world size raises in DeepSpeed
    (``engine._load_zero_checkpoint``), so the range is refused when the strategy is built, saying what to write."""
    with pytest.raises(ConfigurationError, match=r"backend 'deepspeed' cannot resume.*workers=4"):
        get_strategy("deepspeed", workers=(2, 4))


class _Declares:
    def __init__(self, resumes: bool | None, fitting: int | None) -> None:
        self.resumes, self.fitting = resumes, fitting

    @hookimpl
    def raylane_strategy_class(self) -> None:
        return None

    @hookimpl
    def raylane_resumes_on_any_world_size(self) -> bool | None:
        return self.resumes

    @hookimpl
    def raylane_workers_that_fit(self) -> int | None:
        return self.fitting


def test_a_backend_that_says_nothing_cannot_resize_and_one_that_answers_decides() -> None:
    options = LaunchOptions(workers=(1, 3))
    assert BackendHost("silent", _Declares(None, None)).resumes_on_any_world_size(options, {}) is False
    assert BackendHost("elastic", _Declares(True, None)).resumes_on_any_world_size(options, {}) is True


def test_an_extension_that_holds_the_resources_answers_how_many_workers_fit() -> None:
    options = LaunchOptions(workers=(1, 3))
    assert BackendHost("held", _Declares(True, 2)).workers_that_fit(options) == 2


@pytest.mark.parametrize(
    ("strategy", "expected"), [("PACK", 5), ("SPREAD", 5), ("STRICT_PACK", 3), ("STRICT_SPREAD", 3)]
)
def test_workers_that_fit_counts_free_and_own_resources_per_node(strategy: str, expected: int) -> None:
    options = LaunchOptions(workers=(1, 8), cpus_per_worker=2, placement_strategy=strategy)
    free = {"a": {"CPU": 6.0}, "b": {"CPU": 3.5, "GPU": 1.0}, "c": {"CPU": 1.0}}
    held = {"c": {"CPU": 2.0}}  # this run's own worker on node c, back once it stops
    assert workers_that_fit(options, free, held) == expected


def test_a_worker_range_reaches_the_driver_strategy_as_the_most_workers() -> None:
    strategy = get_strategy("ddp", workers=(2, 8))
    assert strategy.launch_options.workers == 8 and strategy.launch_options.min_workers == 2
    assert strategy.num_workers == 8, "before any run: the most workers"
