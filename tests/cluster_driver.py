"""A training script as users run it against a Ray cluster; tests/test_cluster_launch_modes.py runs it four ways.

``python cluster_driver.py [ADDRESS] [--fit-only]``: ADDRESS goes to ``ray.init`` (``auto``, ``ray://host:port``);
without it raylane connects by itself through ``RAY_ADDRESS``, which ``ray job submit`` sets for the job's driver.
The CSV logger and the checkpoints use relative paths, so they must appear under this process's working directory.
Prints one line ``RAYLANE_RESULT {json}`` with what the driver ended up with, including (unless ``--fit-only``) a
second fit and a predict fed by Ray Data (``from_ray``) on the same warm workers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
import torch
from pytorch_lightning.loggers import CSVLogger

from raylane import get_strategy
from raylane.data import from_ray
from raylane.testing import ClassifierModel, make_loader
from raylane.testing.ray_data import RowRecordingModel, make_ray_dataset

RESULT_PREFIX = "RAYLANE_RESULT "
FIT_ONLY = "--fit-only"


def train(model_class: type[ClassifierModel] = ClassifierModel) -> dict[str, Any]:
    torch.manual_seed(0)
    model = model_class()
    initial = model.layer.weight.detach().clone()
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=2),
        max_epochs=2,
        logger=CSVLogger("logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, make_loader(8, samples=64), make_loader(8, samples=32))
    best = Path(trainer.checkpoint_callback.best_model_path)
    saved = torch.load(best, weights_only=False)["state_dict"]["layer.weight"] if best.is_file() else None
    log_dir = Path(trainer.logger.log_dir)
    metrics_csv = log_dir / "metrics.csv"
    return {
        "ray_client": ray.util.client.ray.is_connected(),
        "status": trainer.state.status.value,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
        "weights_changed": not torch.equal(initial, model.layer.weight),
        "checkpoint": str(best.resolve()),
        "checkpoint_holds_driver_weights": saved is not None and torch.equal(saved, model.layer.weight),
        "log_dir": str(log_dir.resolve()),
        "metrics_csv_rows": len(metrics_csv.read_text().splitlines()) if metrics_csv.is_file() else 0,
    }


def train_on_ray_data() -> dict[str, Any]:
    """A fit (train and val) and a predict fed by Ray Datasets: the splits are made from this driver, whichever way it
    reaches the cluster, and the rows stream from Ray Data's coordinator to the workers."""
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
    ray.data.DataContext.get_current().enable_progress_bars = False  # their carriage returns would swallow the report
    model = RowRecordingModel()
    trainer = pl.Trainer(strategy=get_strategy("ddp", workers=2), max_epochs=1, logger=False, **quiet)
    trainer.fit(model, from_ray(make_ray_dataset(64), batch_size=8), from_ray(make_ray_dataset(32), batch_size=8))
    predictions = trainer.predict(model, from_ray(make_ray_dataset(45), batch_size=8))
    trainer.strategy.release_workers()
    return {
        "global_step": trainer.global_step,
        "metrics": sorted(trainer.callback_metrics),
        "predicted_ids": sorted(int(i) for batch in predictions for i in batch["id"]),
    }


def report(model_class: type[ClassifierModel] = ClassifierModel, ray_data: bool = True) -> None:
    result = {"cwd": os.getcwd(), **train(model_class)}
    if ray_data:
        result["ray_data"] = train_on_ray_data()
    print("\n" + RESULT_PREFIX + json.dumps(result), flush=True)  # on a line of its own, whatever came before


if __name__ == "__main__":
    arguments = sys.argv[1:]
    fit_only = FIT_ONLY in arguments  # the first fit alone, for a test about connecting
    addresses = [argument for argument in arguments if argument != FIT_ONLY]
    if addresses:
        ray.init(address=addresses[0])
    report(ray_data=not fit_only)
