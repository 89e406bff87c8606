"""How raylane's start-up grows with the worker count: every phase of a one-step ``fit`` on 1, 2, 4, 8 and 16 workers
on a simulated multi-node cluster (Ray's own ``ray.cluster_utils.Cluster``: a driver-only head node and ``--nodes``
nodes of logical CPUs, all on this machine), the driver's own CPU time, and what its polling costs while the workers
train and while they idle. Each phase that raylane runs on the driver or serially is fitted to a line and to a
parabola (least squares) and extrapolated to 256 and 1,024 workers.

    python benchmarks/startup_scaling.py --repeats 2 [--workers 1 2 4 8 16] [--json startup_scaling.json]

On one machine every worker's imports compete for the same cores, so the per-worker phases grow with the count here
and would not on a real cluster (each node imports in parallel); they are shown apart from raylane's own phases, and
only raylane's are extrapolated. The workers start inside ``fit`` (``RAYLANE_EARLY_START=0``: building the Trainer
would otherwise start them before ``fit`` is called), and every run starts its own (``RAYLANE_WARM_POOL=0``). See
README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from harness.lightning_runs import QUIET_TRAINER
from harness.report import describe_machine, load_average, machine_and_load, publish
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from raylane import get_strategy
from raylane.testing.cluster import local_cluster

EXTRAPOLATE_TO = (256, 1024)
SAMPLE_EVERY_S = 0.05  # the driver's CPU-time sampler
# Phases raylane runs on the driver, or once for all workers: (label, start mark, end mark). A mark is "driver:NAME"
# (the launcher's and the group's marks) or "last:NAME" (the latest over the workers: the phase ends when every
# worker has passed it); a phase between two "each:NAME" marks is the longest any one worker took from one to the other.
RAYLANE_PHASES = (
    ("payload into the object store", "driver:launch", "driver:payload_stored"),
    ("placement group", "driver:start", "driver:placement_ready"),
    ("actor requests", "driver:placement_ready", "driver:actors_requested"),
    ("rendezvous + contexts", "driver:actors_alive", "driver:contexts_ready"),
    ("entry point to every worker", "driver:entry_point_sent", "last:run_started"),
    ("payload fetch (slowest worker)", "each:payload_requested", "each:payload_fetched"),
    ("process group (last join)", "last:payload_loaded", "last:process_group_up"),
    ("outputs back", "last:output_collected", "driver:outputs_received"),
    ("idle watch set up, results applied", "driver:outputs_received", "driver:results_applied"),
)
# Each worker's own CPU work, parallel across nodes on a real cluster (here all on the same few cores).
WORKER_PHASES = (
    ("actor start + torch/raylane imports", "driver:actors_requested", "last:imports_done"),
    ("actors alive (placements known)", "driver:actors_requested", "driver:actors_alive"),
    ("entry point set up (defaults, gc)", "each:run_started", "each:payload_requested"),
    ("payload unpickled (Lightning imports)", "each:payload_fetched", "each:payload_loaded"),
)
DRIVER_CPU = "driver CPU s during fit()"
POLL_RUNNING = "driver CPU s/s while workers train"
POLL_IDLE = "driver CPU s/s while workers idle"
FIT = "fit() wall s"


class SleepyModel(pl.LightningModule):
    """A tiny linear model whose one training step sleeps ``hold_s``: a window in which the workers use no CPU and
    the driver only polls (heartbeat, metric relay), so its CPU then is what polling costs."""

    def __init__(self, hold_s: float) -> None:
        super().__init__()
        self.hold_s = hold_s
        self.net = nn.Linear(4, 2)
        self.window = (0.0, 0.0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        started = time.time()
        time.sleep(self.hold_s)
        self.window = (started, time.time())
        return self.net(batch[0]).square().mean()

    def on_train_end(self) -> None:
        # float64: a float32 time.time() is only good to about 2 minutes.
        for name, at in zip(("hold_from", "hold_to"), self.window):
            self.trainer.callback_metrics[name] = torch.tensor(at, dtype=torch.float64)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CpuSampler:
    """This process's CPU seconds (user + system, all threads: raylane's and Ray's core worker's) over wall time."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._samples.append((time.time(), cpu_seconds()))

    def rate(self, start: float, end: float) -> float:
        """CPU seconds per wall second between ``start`` and ``end`` (interpolated between samples)."""
        if end <= start or len(self._samples) < 2:
            return float("nan")
        times, cpus = np.array(self._samples).T
        return float((np.interp(end, times, cpus) - np.interp(start, times, cpus)) / (end - start))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="fits per worker count; medians are reported")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="worker counts")
    parser.add_argument("--nodes", type=int, default=4, help="simulated nodes besides the driver's (default: 4)")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds the one training step sleeps (default: 2)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds the warm workers idle after fit (default: 2)")
    parser.add_argument("--json", type=Path, help="also write every run, the medians and the fits to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.nodes < 1 or min(args.workers) < 1 or len(set(args.workers)) < 3:
        parser.error("--repeats and --nodes must be at least 1, and --workers at least 3 distinct counts >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Every phase inside fit(): with the early start, building the Trainer would start its workers before fit.
    os.environ["RAYLANE_EARLY_START"] = "0"
    # Cold starts only: on this driver's own cluster, each run's workers would otherwise serve the next (warm pool).
    os.environ["RAYLANE_WARM_POOL"] = "0"
    counts = sorted(set(args.workers))
    cpus_per_node = -(-max(counts) // args.nodes)  # logical CPUs: one per worker, never the cores' count
    load_at_start = load_average()
    runs: dict[int, list[dict[str, float]]] = {count: [] for count in counts}
    with local_cluster(nodes=[{"num_cpus": cpus_per_node, "object_store_memory": 128 * 2**20}] * args.nodes):
        logging.getLogger("ray").setLevel(logging.WARNING)
        with CpuSampler() as sampler:
            time.sleep(args.idle)
            baseline = sampler.rate(time.time() - args.idle + 0.1, time.time() - 0.1)  # Ray's own threads
            fit_once(1, args, sampler, baseline)  # warm-up: the driver's first fit imports the backend and more
            for repeat in range(args.repeats):  # round-robin: load changes spread over every count
                for count in counts:
                    run = fit_once(count, args, sampler, baseline)
                    runs[count].append(run)
                    print(
                        f"[{repeat + 1}/{args.repeats}] {count:>3} worker(s): fit {run[FIT]:.2f} s, driver CPU "
                        f"{run[DRIVER_CPU]:.2f} s, outputs back {run['outputs back']:.3f} s",
                        flush=True,
                    )
    report = summarise(runs, args, baseline, load_at_start)
    publish(report, format_report(report), args.json)
    return 0


def fit_once(workers: int, args: argparse.Namespace, sampler: CpuSampler, baseline: float) -> dict[str, float]:
    """One fit on ``workers`` workers spread over the nodes; its phases in seconds and the driver's CPU."""
    strategy = get_strategy(
        "ddp", workers=workers, placement_strategy="SPREAD", idle_timeout=60, lightning="pytorch_lightning"
    )
    trainer = pl.Trainer(strategy=strategy, max_steps=1, accelerator="cpu", **QUIET_TRAINER)
    loader = DataLoader(TensorDataset(torch.randn(workers, 4)), batch_size=1)
    try:
        started, cpu_before = time.time(), cpu_seconds()
        trainer.fit(SleepyModel(args.hold), loader)
        returned, cpu_after = time.time(), cpu_seconds()
        time.sleep(args.idle)  # the warm workers idle; the idle watch polls
        idle_rate = sampler.rate(returned + 0.1, time.time() - 0.1)
    finally:
        trainer.strategy.release_workers()  # type: ignore[attr-defined]
    timeline = trainer.strategy.launcher.timeline  # type: ignore[attr-defined]
    hold = [float(trainer.callback_metrics[name]) for name in ("hold_from", "hold_to")]
    run = {label: span(timeline, start, end) for label, start, end in (*RAYLANE_PHASES, *WORKER_PHASES)}
    run[FIT] = returned - started
    run[DRIVER_CPU] = cpu_after - cpu_before
    run[POLL_RUNNING] = sampler.rate(hold[0] + 0.2, hold[1] - 0.2) - baseline
    run[POLL_IDLE] = idle_rate - baseline
    return run


def span(timeline: Mapping[str, Any], start: str, end: str) -> float:
    if start.startswith("each:") and end.startswith("each:"):
        begin, finish = start.removeprefix("each:"), end.removeprefix("each:")
        return max(float(marks[finish]) - float(marks[begin]) for marks in timeline["workers"])
    return mark(timeline, end) - mark(timeline, start)


def mark(timeline: Mapping[str, Any], name: str) -> float:
    where, _, key = name.partition(":")
    if where == "driver":
        return float(timeline["driver"][key])
    return max(float(marks[key]) for marks in timeline["workers"])


def fit_curves(counts: Sequence[int], seconds: Sequence[float]) -> dict[str, Any]:
    """Least-squares line and parabola through (count, seconds), their R^2 and their values at EXTRAPOLATE_TO."""
    x, y = np.asarray(counts, dtype=float), np.asarray(seconds, dtype=float)
    fits: dict[str, Any] = {}
    for name, degree in (("linear", 1), ("quadratic", 2)):
        coefficients = np.polyfit(x, y, degree)
        residual = float(np.sum((np.polyval(coefficients, x) - y) ** 2))
        total = float(np.sum((y - y.mean()) ** 2))
        fits[name] = {
            "coefficients_high_first": [float(c) for c in coefficients],
            "r2": 1.0 - residual / total if total > 0 else 1.0,
            "at": {str(n): float(np.polyval(coefficients, n)) for n in EXTRAPOLATE_TO},
        }
    return fits


def summarise(
    runs: Mapping[int, Sequence[Mapping[str, float]]], args: argparse.Namespace, baseline: float, load: float
) -> dict[str, Any]:
    counts = sorted(runs)
    labels = list(next(iter(runs.values()))[0])
    medians = {label: [median(run[label] for run in runs[count]) for count in counts] for label in labels}
    raylane_side = [label for label, *_ in RAYLANE_PHASES] + [DRIVER_CPU, POLL_RUNNING, POLL_IDLE]
    return {
        "machine": machine_and_load(load),
        "cluster": {"nodes": args.nodes, "head_cpus": 0, "hold_s": args.hold, "idle_s": args.idle},
        "repeats": args.repeats,
        "workers": counts,
        "baseline_driver_cpu_s_per_s": baseline,
        "runs": {str(count): list(values) for count, values in runs.items()},
        "medians": medians,
        "raylane_side": raylane_side,
        "fits": {label: fit_curves(counts, medians[label]) for label in raylane_side},
    }


def format_report(report: Mapping[str, Any]) -> str:
    counts, medians = report["workers"], report["medians"]
    cluster = report["cluster"]
    lines = [
        f"one-step fit on a simulated cluster: driver-only head + {cluster['nodes']} nodes (SPREAD placement); medians "
        f"of {report['repeats']} runs; {describe_machine(report['machine'])}",
        f"driver CPU with no workers (Ray's own threads): {report['baseline_driver_cpu_s_per_s']:.3f} s/s, subtracted "
        "from the polling rows",
        "",
        f"{'seconds (medians) / workers':<40}" + "".join(f"{count:>9}" for count in counts),
    ]
    worker_labels = [label for label, *_ in WORKER_PHASES]
    for title, labels in (
        ("raylane: driver side, or once for all workers", report["raylane_side"]),
        ("per worker: each worker's own imports (parallel on a real cluster)", [*worker_labels, FIT]),
    ):
        lines.append(f"-- {title}")
        for label in labels:
            lines.append(f"  {label:<38}" + "".join(f"{value:>9.3f}" for value in medians[label]))
    lines += ["", "fits of raylane's phases (seconds = polynomial in workers), extrapolated:"]
    lines.append(f"  {'phase':<38} {'fit':<10} {'R^2':>6} {'s/worker':>9} {'x^2 coef':>10} {'@256':>9} {'@1024':>9}")
    for label, fits in report["fits"].items():
        for name, fit in fits.items():
            coefficients = fit["coefficients_high_first"]
            slope = coefficients[-2]
            square = coefficients[0] if name == "quadratic" else 0.0
            lines.append(
                f"  {label if name == 'linear' else '':<38} {name:<10} {fit['r2']:>6.2f} {slope:>13.5f} "
                f"{square:>10.2e} {fit['at']['256']:>9.2f} {fit['at']['1024']:>9.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
