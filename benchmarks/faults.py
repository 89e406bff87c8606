"""The fault table: for each way a run can fail, how long until the driver raises, and what (if anything) stays.

Every fault is real: exceptions raised in a worker, signals sent to worker processes, a node removed from Ray's
one-machine multi-node cluster, placement groups that hold the CPUs. Each runs ``--repeats`` times (default 5) on a
fresh pair of workers; the table gives the median seconds from the fault (a marker file touched just before it) and
from ``trainer.fit()`` to the driver's exception, the exception and rank it named, and whether any raylane actor or
placement group was still alive 15 s after the error.

    python benchmarks/faults.py [--repeats 5] [--only kill_outside,node_lost]

Writes ``benchmarks/results/faults.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, remove_placement_group

from raylane import get_strategy
from raylane.testing import ClassifierModel, assert_released, make_loader, signal_worker, worker_pid

RESULTS = Path(__file__).parent / "results"
COLLECTIVE_TIMEOUT_S = 10
HEARTBEAT_TIMEOUT_S = 10
RESOURCE_TIMEOUT_S = 5


def _mark(marker: str) -> None:
    """Record the moment of the fault (the file's mtime) just before causing it."""
    Path(marker).touch()


class RaisingCallback(pl.Callback):
    """Raises in a callback on rank 1, after the first optimizer step."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == 1 and trainer.global_step >= 1:
            _mark(self.marker)
            raise RuntimeError("callback failed on rank 1")


class RaisingSetup(ClassifierModel):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def setup(self, stage: str) -> None:
        if self.global_rank == 1:
            _mark(self.marker)
            raise ValueError("setup failed on rank 1")


def _explode_on_rank_one(marker: str, batch: list[Any]) -> Any:
    import torch.distributed as dist
    from torch.utils.data import default_collate

    if dist.get_rank() == 1:
        _mark(marker)
        raise RuntimeError("DataLoader worker failed on rank 1")
    return default_collate(batch)


def _in_model(mode: str, rank: int = 1) -> Callable[[str], pl.LightningModule]:
    # fail_once_marker is touched right before the failure: its mtime is the moment of the fault.
    return lambda marker: ClassifierModel(fail_on_rank=rank, fail_at_step=1, fail_mode=mode, fail_once_marker=marker)


def _stall_rank_zero(marker: str) -> pl.LightningModule:
    """Rank 0 stalls in its step (marking nothing), so a fault from outside hits rank 1 blocked in allreduce."""
    return ClassifierModel(fail_on_rank=0, fail_at_step=1, fail_mode="hang")


def _kill_rank_one(cluster: Cluster, marker: str) -> None:
    worker_pid(1)
    _mark(marker)
    signal_worker(1, signal.SIGKILL)


def _remove_node_of_rank_one(cluster: Cluster, marker: str) -> None:
    worker_pid(1)
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(":rank-1")]
    node_id = ray.get(ray.get_actor(name).describe.remote(), timeout=30).node_id
    [node] = [node for node in cluster.worker_nodes if node.node_id == node_id]
    _mark(marker)
    cluster.remove_node(node, allow_graceful=False)


def _add_node(cluster: Cluster) -> None:
    cluster.add_node(num_cpus=2)  # from the main thread: Ray's node start installs signal handlers


@dataclass(frozen=True)
class Fault:
    """How to provoke one failure. Each callable gets the path of the marker file whose mtime records the fault."""

    description: str
    model: Callable[[str], pl.LightningModule] = lambda marker: ClassifierModel()
    strategy: dict[str, Any] = field(default_factory=dict)
    callbacks: Callable[[str], list[pl.Callback]] = lambda marker: []
    loader: Callable[[str], dict[str, Any]] = lambda marker: {}
    outside: Callable[[Cluster, str], None] | None = None  # runs in a thread while fit() runs
    restore: Callable[[Cluster], None] | None = None  # puts the cluster back afterwards
    workers: int = 2
    hold_cpus: bool = False  # another placement group holds every CPU while the fit waits


FAULTS = {
    "raise_step": Fault("training_step raises on rank 1", _in_model("raise")),
    "raise_callback": Fault("a callback raises on rank 1", callbacks=lambda marker: [RaisingCallback(marker)]),
    "raise_dataloader": Fault(
        "a DataLoader worker process raises on rank 1",
        loader=lambda marker: {"num_workers": 1, "collate_fn": functools.partial(_explode_on_rank_one, marker)},
    ),
    "raise_setup": Fault("LightningModule.setup raises on rank 1", RaisingSetup),
    "kill_self": Fault("rank 1 SIGKILLs itself mid-step", _in_model("kill")),
    "kill_outside": Fault(
        "rank 1 SIGKILLed from outside while blocked in allreduce", _stall_rank_zero, outside=_kill_rank_one
    ),
    "node_lost": Fault(
        "the node of rank 1 is removed from the cluster",
        _stall_rank_zero,
        strategy={"placement_strategy": "STRICT_SPREAD"},
        outside=_remove_node_of_rank_one,
        restore=_add_node,
    ),
    "frozen": Fault(
        f"rank 1 frozen by SIGSTOP (heartbeat_timeout={HEARTBEAT_TIMEOUT_S})",
        _in_model("freeze"),
        strategy={"heartbeat_timeout": HEARTBEAT_TIMEOUT_S},
    ),
    "stuck_collective": Fault(
        f"rank 1 alive but never joins the allreduce (collective_timeout={COLLECTIVE_TIMEOUT_S})",
        _in_model("hang"),
        strategy={"collective_timeout": COLLECTIVE_TIMEOUT_S},
    ),
    "never_fits": Fault("more workers than the cluster has CPUs (fails before any actor starts)", workers=64),
    "busy": Fault(
        f"the CPUs are held by another placement group (resource_timeout={RESOURCE_TIMEOUT_S})",
        strategy={"resource_timeout": RESOURCE_TIMEOUT_S},
        hold_cpus=True,
    ),
}


def run_once(fault: Fault, cluster: Cluster, root: Path) -> dict[str, Any]:
    marker = str(root / f"fault-{time.monotonic_ns()}")
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=fault.workers, **fault.strategy),
        max_epochs=50,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=fault.callbacks(marker),
    )
    blocker = None
    if fault.hold_cpus:
        blocker = placement_group([{"CPU": 1}] * int(ray.cluster_resources()["CPU"]), strategy="PACK")
        ray.get(blocker.ready(), timeout=60)
    outside = None
    if fault.outside is not None:
        outside = threading.Thread(target=fault.outside, args=(cluster, marker), daemon=True)
        outside.start()
    started = time.time()
    try:
        trainer.fit(fault.model(marker), make_loader(8, samples=256, **fault.loader(marker)))
        raise AssertionError(f"{fault.description}: fit() returned instead of raising")
    except Exception as err:  # what the user sees
        raised_at, error = time.time(), err
    finally:
        if blocker is not None:
            remove_placement_group(blocker)
    if outside is not None:
        outside.join(timeout=60)
    try:
        assert_released(timeout_s=15)
        leftover = ""
    except AssertionError as leak:
        leftover = str(leak)
    if fault.restore is not None:
        fault.restore(cluster)
    # Faults that happen before the workers start (resources) count from fit().
    fault_at = os.path.getmtime(marker) if os.path.exists(marker) else started
    return {
        "from_fit_s": raised_at - started,
        "from_fault_s": raised_at - fault_at,
        "error": type(error).__name__,
        "rank": getattr(error, "rank", None),
        "message": str(error).splitlines()[0][:200],
        "leftover": leftover,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=",".join(FAULTS), help="comma-separated fault names")
    args = parser.parse_args()
    os.environ["RAYLANE_WARM_POOL"] = "0"  # what stays behind is the run's own, not workers left for a next script
    names = args.only.split(",")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="raylane-faults-"))
    table = {}
    try:
        for name in names:
            runs = [run_once(FAULTS[name], cluster, root) for _ in range(args.repeats)]
            table[name] = {"description": FAULTS[name].description, "runs": runs}
            median_s = statistics.median(run["from_fault_s"] for run in runs)
            print(f"{name}: median {median_s:.1f} s, {runs[-1]['error']} rank={runs[-1]['rank']}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "faults": table,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(report, indent=2))
    print("\n| Fault | Fault to error, median (min-max) s | fit() to error, median s | Raised | Rank | Left behind |")
    print("|---|---|---|---|---|---|")
    for entry in table.values():
        runs = entry["runs"]
        after_fault = [run["from_fault_s"] for run in runs]
        after_fit = [run["from_fit_s"] for run in runs]
        leftovers = sum(bool(run["leftover"]) for run in runs)
        errors = ", ".join(sorted({run["error"] for run in runs}))
        ranks = ", ".join(sorted({str(run["rank"]) for run in runs}))
        print(
            f"| {entry['description']} | {statistics.median(after_fault):.1f} ({min(after_fault):.1f}-"
            f"{max(after_fault):.1f}) | {statistics.median(after_fit):.1f} | {errors} | {ranks} "
            f"| {'nothing' if not leftovers else f'{leftovers} of {len(runs)} runs'} |"
        )


if __name__ == "__main__":
    main()
