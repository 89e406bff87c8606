"""Samples/s of raylane's DDP on 1 and 2 workers with a compute-bound step, and the bytes each step's gradient
allreduce moves against the model's size.

    python benchmarks/scaling.py --repeats 3 [--json scaling.json]

Weak scaling: every worker trains a batch of ``--batch-per-worker`` samples per step, so 2 workers take half the steps
of 1 over the same samples. samples/s counts rank 0's training loop only (start-up excluded). See README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import median

import pytorch_lightning as pl
import ray
import torch
from harness import lightning_runs
from harness.report import describe_machine, load_average, machine_and_load, publish
from harness.timer import LOOP_S
from harness.workload import Workload
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

WORKER_COUNTS = (1, 2)
BYTES_PER_STEP = "allreduce_bytes_per_step"
MODEL_BYTES = "model_bytes"


class AllreduceBytes(pl.Callback):
    """Counts the gradient bytes DDP hands to allreduce, through a communication hook that then does the usual
    allreduce. Registered here because Lightning only registers ``ddp_comm_hook`` on CUDA."""

    def __init__(self) -> None:
        self.bytes = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bytes = 0
        trainer.strategy.model.register_comm_hook(self, _counting_allreduce)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics[BYTES_PER_STEP] = torch.tensor(self.bytes / max(1, trainer.global_step))
        params = [p for p in pl_module.parameters() if p.requires_grad]
        trainer.callback_metrics[MODEL_BYTES] = torch.tensor(float(sum(p.numel() * p.element_size() for p in params)))


def _counting_allreduce(state: AllreduceBytes, bucket):  # type: ignore[no-untyped-def]
    # Unannotated on purpose: DDP rejects a hook whose annotations are not its own types, and this module's are strings.
    state.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]  # None: the default process group


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each worker count (default: 3)")
    parser.add_argument("--samples", type=int, default=32_768, help="generated training samples (default: 32768)")
    parser.add_argument("--batch-per-worker", type=int, default=1024, help="samples per worker per step")
    parser.add_argument("--hidden", type=int, default=8192, help="width of the MLP's hidden layer (default: 8192)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    ray.init(address="local", num_cpus=max(WORKER_COUNTS), logging_level=logging.WARNING)
    runs: dict[int, list[dict[str, float]]] = {workers: [] for workers in WORKER_COUNTS}
    try:
        for repeat in range(args.repeats):
            for workers in WORKER_COUNTS if repeat % 2 == 0 else reversed(WORKER_COUNTS):
                runs[workers].append(run_once(workers, args))
                last = runs[workers][-1]
                print(
                    f"[{repeat + 1}/{args.repeats}] {workers} worker(s): {last['samples_per_s']:.0f} samples/s, "
                    f"{last[BYTES_PER_STEP] / 1e6:.2f} MB allreduced per step",
                    flush=True,
                )
    finally:
        ray.shutdown()
    medians = {
        workers: {key: median(run[key] for run in results) for key in results[0]} for workers, results in runs.items()
    }
    one, two = medians[1], medians[2]
    report = {
        "machine": machine_and_load(load_at_start),
        "workload": {"samples": args.samples, "batch_per_worker": args.batch_per_worker, "hidden": args.hidden},
        "runs": {str(workers): results for workers, results in runs.items()},
        "medians": {str(workers): figures for workers, figures in medians.items()},
        "speedup": two["samples_per_s"] / one["samples_per_s"],
        "efficiency_vs_2x": two["samples_per_s"] / (2 * one["samples_per_s"]),
        "allreduce_bytes_over_model_bytes": two[BYTES_PER_STEP] / two[MODEL_BYTES],
    }
    lines = [
        f"DigitsClassifier(hidden={args.hidden}): {two[MODEL_BYTES] / 1e6:.2f} MB of fp32 parameters; "
        f"{args.samples} samples, {args.batch_per_worker} per worker per step; medians of {args.repeats}; "
        + describe_machine(report["machine"])
    ]
    for workers, figures in medians.items():
        lines.append(f"{workers} worker(s): {figures['samples_per_s']:.0f} samples/s (loop {figures[LOOP_S]:.2f} s)")
    lines.append(
        f"2 workers / 1: {report['speedup']:.2f}x the samples/s, {report['efficiency_vs_2x']:.0%} of the 2x limit; "
        f"allreduce per step {two[BYTES_PER_STEP] / 1e6:.2f} MB per rank = "
        f"{report['allreduce_bytes_over_model_bytes']:.2f}x the model's gradients"
    )
    publish(report, "\n".join(lines), args.json)
    return 0


def run_once(workers: int, args: argparse.Namespace) -> dict[str, float]:
    workload = Workload(samples=args.samples, epochs=1, batch_size=args.batch_per_worker * workers, hidden=args.hidden)
    counter = AllreduceBytes()
    trainer, model, data = lightning_runs.build("raylane", workload, callbacks=[counter], workers=workers)
    try:
        trainer.fit(model, datamodule=data)
    finally:
        lightning_runs.release_workers(trainer)
    metrics = {name: float(trainer.callback_metrics[name]) for name in (LOOP_S, BYTES_PER_STEP, MODEL_BYTES)}
    return {**metrics, "samples_per_s": args.samples / metrics[LOOP_S]}


if __name__ == "__main__":
    sys.exit(main())
