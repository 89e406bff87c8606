"""Train on a Ray Dataset streamed into the workers, then predict and join the predictions back to the rows.

    python examples/train_ray_data.py --workers 2 --epochs 4

The data is generated lazily (``ray.data.range`` mapped to rows) and preprocessed in Ray Data's own tasks
(``map_batches``); each worker streams its own shard, nothing is materialised in this process. Without a cluster
(``RAY_ADDRESS``), a local Ray starts with CPUs for the workers and two more for Ray Data's tasks.
"""

# ci-session: integration  (where `nox` runs this example with --smoke; see noxfile.py)
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import ray
import torch
from torch import nn

from raylane import get_strategy
from raylane.data import from_ray

FEATURES, CLASSES = 16, 4


def make_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Preprocessing, run by Ray Data's tasks: features and a label computed from each row's id."""
    ids = batch["id"]
    features = np.stack([np.sin(ids * (0.11 + 0.07 * j)) for j in range(FEATURES)], axis=1).astype(np.float32)
    teacher = np.random.default_rng(0).normal(size=(FEATURES, CLASSES)).astype(np.float32)
    return {"id": ids, "x": features, "y": (features @ teacher).argmax(axis=1)}


def rows(count: int, start: int = 0) -> ray.data.Dataset:
    return ray.data.range(count).map_batches(lambda batch: make_rows({"id": batch["id"] + start}))


class Classifier(pl.LightningModule):
    """Reads dict batches (``x``, ``y``, ``id``); predict returns the id with each prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    # The steps call self(...), never self.net directly: sharding backends (fsdp) gather weights around forward.
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        accuracy = (self(batch["x"]).argmax(dim=1) == batch["y"]).float().mean()
        self.log("val_acc", accuracy, sync_dist=True)  # each rank validates its own shard

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"id": batch["id"], "label": self(batch["x"]).argmax(dim=1)}

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="Ray worker processes (default: 2)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    parser.add_argument("--rows", type=int, default=20_000, help="training rows (default: 20000)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size per worker (default: 128)")
    parser.add_argument("--smoke", action="store_true", help="one epoch on fewer rows: a quick check that it runs (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.rows = 1, 4_000
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(0, verbose=False)
    if not os.environ.get("RAY_ADDRESS"):
        # Ray Data's tasks need CPUs the workers do not hold (creating a Dataset would start Ray with one per core).
        ray.init(num_cpus=max(os.cpu_count() or 1, args.workers + 2))
    ray.data.DataContext.get_current().enable_progress_bars = False  # keep the output to what this script prints
    train, val, test = rows(args.rows), rows(2_000, start=10**6), rows(1_000, start=2 * 10**6)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        strategy=get_strategy("ddp", workers=args.workers),
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
    )
    model = Classifier()
    start = time.perf_counter()
    trainer.fit(model, from_ray(train, batch_size=args.batch_size), from_ray(val, batch_size=512))
    print(
        f"trained {args.epochs} epochs on {args.workers} workers in {time.perf_counter() - start:.1f} s; "
        f"val accuracy: {float(trainer.callback_metrics['val_acc']):.2f}"
    )
    predictions = trainer.predict(model, from_ray(test, batch_size=512))  # every row once, rank 0's first
    predicted = {int(i): int(label) for batch in predictions for i, label in zip(batch["id"], batch["label"])}
    truth = {int(row["id"]): int(row["y"]) for row in test.iter_rows()}  # small: fine to read here
    assert predicted.keys() == truth.keys(), "one prediction per row"
    accuracy = np.mean([predicted[i] == truth[i] for i in truth])
    print(f"test accuracy (predictions joined to rows by id): {accuracy:.2f}")


if __name__ == "__main__":
    main()
