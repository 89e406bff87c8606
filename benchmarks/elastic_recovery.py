"""Elastic recovery: from a node's loss to training running again on the workers that are left.

A fit with ``workers=(1, 2)`` runs on Ray's one-machine multi-node cluster (a driver-only head and two one-CPU nodes).
In its second epoch rank 1 stalls (alive, so only the node's loss ends it) and the benchmark removes rank 1's node.
Each repeat measures, from the removal:

- ``restart_s``: until the driver decides to restart (the restart warning): Ray reporting the node dead, the driver's
  heartbeat (``heartbeat_timeout``) or the peers' collective failing, and releasing the old workers;
- ``training_s``: until the restarted run (one worker, resumed from the newest checkpoint) finishes its first
  training step.

    python benchmarks/elastic_recovery.py [--repeats 5] [--heartbeat-timeout 10]

Prints the median and the spread and writes ``benchmarks/results/elastic_recovery.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
from pytorch_lightning.callbacks import ModelCheckpoint

from raylane import get_strategy
from raylane.testing import ClassifierModel, assert_released, make_loader
from raylane.testing.cluster import local_cluster
from raylane.testing.faults import wait_for_file

RESULTS = Path(__file__).parent / "results"


class StallingModel(ClassifierModel):
    """Rank 1 stalls in epoch 1 (writing its node id first); the first step of a one-worker run records its time."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        directory = Path(self.directory)
        if self.trainer.world_size == 2 and self.global_rank == 1 and self.current_epoch >= 1:
            (directory / "stalled").write_text(ray.get_runtime_context().get_node_id())
            time.sleep(3600)
        if self.trainer.world_size == 1 and (directory / "stalled").exists() and not (directory / "resumed").exists():
            (directory / "resumed").write_text(repr(time.time()))
        return super().training_step(batch, batch_idx)


class RestartTimes(logging.Handler):
    """When the driver logged its restart decision."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.at: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "restarting fit from" in record.getMessage():
            self.at.append(record.created)


def one_repeat(cluster: Any, heartbeat_timeout: float, restarts: RestartTimes) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        removed_at: list[float] = []

        def remove_stalled_node() -> None:
            wait_for_file(directory / "stalled", timeout_s=300)
            node_id = (directory / "stalled").read_text()
            [node] = [node for node in cluster.worker_nodes if node.node_id == node_id]
            removed_at.append(time.time())
            cluster.remove_node(node, allow_graceful=False)

        remover = threading.Thread(target=remove_stalled_node, daemon=True)
        trainer = pl.Trainer(
            strategy=get_strategy("ddp", workers=(1, 2), max_failures=1, heartbeat_timeout=heartbeat_timeout),
            max_epochs=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(dirpath=str(directory / "ckpt"), every_n_epochs=1)],
        )
        restarts.at.clear()
        remover.start()
        trainer.fit(StallingModel(str(directory)), make_loader(4, samples=16))
        remover.join(timeout=30)
        trainer.strategy.release_workers()
        assert_released()
        resumed_at = float((directory / "resumed").read_text())
        return {"restart_s": restarts.at[0] - removed_at[0], "training_s": resumed_at - removed_at[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    args = parser.parse_args()
    os.environ["RAYLANE_WARM_POOL"] = "0"  # every restart starts fresh workers, as after a lost node
    restarts = RestartTimes()
    logging.getLogger("raylane").addHandler(restarts)
    load_before = os.getloadavg()
    runs = []
    with local_cluster(nodes=[{"num_cpus": 1}, {"num_cpus": 1}]) as cluster:
        for repeat in range(args.repeats):
            runs.append(one_repeat(cluster, args.heartbeat_timeout, restarts))
            print(f"repeat {repeat + 1}: {runs[-1]}", flush=True)
            cluster.add_node(num_cpus=1)  # the lost node comes back for the next repeat
            cluster.wait_for_nodes()
    summary = {
        name: {
            "median": statistics.median(r[name] for r in runs),
            "min": min(r[name] for r in runs),
            "max": max(r[name] for r in runs),
        }
        for name in ("restart_s", "training_s")
    }
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "heartbeat_timeout": args.heartbeat_timeout,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "elastic_recovery.json").write_text(json.dumps(report, indent=2))
    print("| from the node's loss to | median s | min s | max s |\n|---|---|---|---|")
    for name, label in (("restart_s", "the driver's restart decision"), ("training_s", "the first step on 1 worker")):
        figures = summary[name]
        print(f"| {label} | {figures['median']:.1f} | {figures['min']:.1f} | {figures['max']:.1f} |")
    print(f"load average before {load_before[0]:.1f}, after {report['load_average_after'][0]:.1f}")


if __name__ == "__main__":
    main()
