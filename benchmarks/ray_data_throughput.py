"""Is ``from_ray`` (preprocessing in Ray Data's tasks) at least as fast as a torch DataLoader (preprocessing in
``__getitem__``, in ``num_workers`` processes) when preprocessing dominates? Samples/s of ``fit`` on the same cores.

    python benchmarks/ray_data_throughput.py                       # 20000 rows, 3 epochs, 2 workers
    python benchmarks/ray_data_throughput.py --rows 50000 --work 40 --json data.json

Both configurations train the same network with raylane's ddp backend on ``--workers`` workers and get the same
``--data-cpus`` CPUs beside them for preprocessing: the DataLoader as ``data_cpus / workers`` loader processes per rank,
Ray Data as that many CPUs of its own tasks. The preprocessing is the same numpy function (``--work`` rounds of
trigonometry on a 64-wide row); the DataLoader calls it per row, Ray Data per block. Samples/s are measured by rank 0
over the epochs after the first (which pays the start of the loader processes or of Ray Data's pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import ray
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from raylane import get_strategy
from raylane.data import from_ray

FEATURES, CLASSES = 64, 10


def preprocess(ids: np.ndarray, work: int) -> dict[str, np.ndarray]:
    """The expensive part: ``work`` rounds of elementwise maths per row."""
    x = np.outer(ids.astype(np.float64), np.linspace(0.01, 1.0, FEATURES))
    for _ in range(work):
        x = np.sin(x) * np.cos(x * 1.3) + 0.1 * x
    return {"x": x.astype(np.float32), "y": (ids % CLASSES).astype(np.int64)}


class PreprocessingDataset(Dataset):
    """The DataLoader's side: one row per ``__getitem__``."""

    def __init__(self, rows: int, work: int) -> None:
        self.rows, self.work = rows, work

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = preprocess(np.array([index]), self.work)
        return {"x": torch.from_numpy(row["x"][0]), "y": int(row["y"][0])}


class Model(pl.LightningModule):
    """A small MLP; rank 0 logs the samples/s of every epoch after the first."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows
        self.net = nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, CLASSES))
        self.rates: list[float] = []

    def on_train_epoch_start(self) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if self.current_epoch > 0:
            self.rates.append(self.rows / (time.perf_counter() - self.started))
            self.log("samples_per_s", float(np.median(self.rates)), rank_zero_only=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run(kind: str, args: argparse.Namespace) -> float:
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        strategy=get_strategy("ddp", workers=args.workers, idle_timeout=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    model = Model(args.rows)
    if kind == "dataloader":
        loader: Any = DataLoader(
            PreprocessingDataset(args.rows, args.work),
            batch_size=args.batch_size,
            num_workers=max(1, args.data_cpus // args.workers),
            persistent_workers=True,
        )
    else:
        work = args.work
        dataset = ray.data.range(args.rows).map_batches(lambda batch: preprocess(batch["id"], work))
        loader = from_ray(dataset, batch_size=args.batch_size)
    trainer.fit(model, loader)
    return float(trainer.callback_metrics["samples_per_s"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: the first is not measured")
    parser.add_argument("--work", type=int, default=20, help="rounds of preprocessing maths per row")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-cpus", type=int, default=2, help="CPUs for preprocessing beside the workers'")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ray.init(address="local", num_cpus=args.workers + args.data_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    load_before = os.getloadavg()[0]
    figures: dict[str, list[float]] = {"dataloader": [], "from_ray": []}
    for _ in range(args.repeats):
        for kind in figures:  # take turns, so a change in the machine's load spreads over both
            figures[kind].append(run(kind, args))
    medians = {kind: float(np.median(rates)) for kind, rates in figures.items()}
    report = {
        "args": vars(args),
        "samples_per_s": figures,
        "median": medians,
        "from_ray_over_dataloader": medians["from_ray"] / medians["dataloader"],
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "cores": os.cpu_count(),
    }
    for kind, rate in medians.items():
        print(f"{kind:>10}: {rate:9.0f} samples/s")
    print(
        f"from_ray / dataloader: {report['from_ray_over_dataloader']:.2f}  (load average {load_before:.1f} -> "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
