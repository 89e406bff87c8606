"""Does the driver's memory stay flat while the workers train on a dataset far larger than the driver could hold?

    python benchmarks/ray_data_scale.py                       # 1x and 10x of a 200 MB "driver budget"
    python benchmarks/ray_data_scale.py --budget-mb 500 --json scale.json

The dataset is generated lazily (``ray.data.range`` mapped to rows of ``--row-floats`` float32 in Ray Data's tasks),
once at the size of the budget and once ten times larger, and streamed into ``--workers`` ddp workers with
``from_ray`` for one epoch. Reported per size: the driver's peak RSS (``ru_maxrss`` of this process, which never holds
the data) and, logged by the ranks, each worker's peak RSS and peak USS. RSS counts the pages of Ray's shared-memory
object store a rank has read blocks from, which stay mapped until the store reuses them; USS (memory only this
process holds, sampled every ``USS_EVERY`` steps) is what the rank itself allocates, and bounded means the 10x row's
USS is within noise of the 1x row's. Flat means the 10x row is within noise of the 1x row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import psutil
import pytorch_lightning as pl
import ray
import torch
from torch import nn

from raylane import get_strategy
from raylane.data import from_ray

USS_EVERY = 10  # steps between samples of a rank's unique memory (reading smaps costs milliseconds)


class Model(pl.LightningModule):
    """A linear layer over wide rows; each rank logs its peak RSS and sampled peak USS at the end of the epoch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, 10)
        self.peak_uss_mb = 0.0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx % USS_EVERY == 0:
            uss_mb = psutil.Process().memory_full_info().uss / 2**20
            self.peak_uss_mb = max(self.peak_uss_mb, uss_mb)
        return nn.functional.cross_entropy(self.layer(batch["x"]), batch["y"])

    def on_train_epoch_end(self) -> None:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.log("worker_peak_rss_mb", peak_mb, reduce_fx="max", sync_dist=True)
        self.log("worker_peak_uss_mb", self.peak_uss_mb, reduce_fx="max", sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def train(rows: int, args: argparse.Namespace) -> dict[str, float]:
    width = args.row_floats

    def make_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        x = np.sin(np.outer(ids, np.arange(width, dtype=np.float32) * 1e-3)).astype(np.float32)
        return {"x": x, "y": ids % 10}

    dataset = ray.data.range(rows).map_batches(make_rows)
    trainer = pl.Trainer(
        max_epochs=1,
        strategy=get_strategy("ddp", workers=args.workers, idle_timeout=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    started = time.perf_counter()
    trainer.fit(Model(width), from_ray(dataset, batch_size=args.batch_size))
    return {
        "rows": rows,
        "dataset_mb": rows * width * 4 / 2**20,
        "fit_s": time.perf_counter() - started,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": float(trainer.callback_metrics["worker_peak_rss_mb"]),
        "worker_peak_uss_mb": float(trainer.callback_metrics["worker_peak_uss_mb"]),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=int, default=200, help="what the driver 'could hold'; 10x is streamed")
    parser.add_argument("--row-floats", type=int, default=1024, help="float32 values per row (4 KiB by default)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-cpus", type=int, default=2, help="CPUs for Ray Data beside the workers'")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ray.init(address="local", num_cpus=args.workers + args.data_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    load_before = os.getloadavg()[0]
    rows_1x = args.budget_mb * 2**20 // (args.row_floats * 4)
    results = [train(rows_1x, args), train(10 * rows_1x, args)]
    for result in results:
        print(
            f"{result['dataset_mb']:8.0f} MB streamed in {result['fit_s']:6.1f} s: driver peak RSS "
            f"{result['driver_peak_rss_mb']:6.0f} MB, worker peak RSS {result['worker_peak_rss_mb']:6.0f} MB, "
            f"worker peak USS {result['worker_peak_uss_mb']:6.0f} MB"
        )
    print(f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"args": vars(args), "results": results, "load_average_1min": [load_before, os.getloadavg()[0]]},
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
