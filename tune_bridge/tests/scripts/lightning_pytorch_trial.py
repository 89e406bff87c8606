"""A user's Tune script written against ``lightning.pytorch`` that never says which Lightning it uses."""

import json
import sys

import lightning.pytorch as pl
import ray
import torch
from ray import tune
from torch.utils.data import DataLoader, TensorDataset

from raylane import get_strategy
from raylane_tune import TuneReportCallback, get_tune_resources


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = torch.nn.functional.cross_entropy(self.layer(inputs), targets)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=generator), torch.randint(0, 2, (32,), generator=generator))
    return DataLoader(data, batch_size=8)


def trial(config: dict) -> None:
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=2),
        max_epochs=config["epochs"],
        callbacks=[TuneReportCallback("loss", on="train_epoch_end")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Tiny(), loader())


if __name__ == "__main__":
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    tuner = tune.Tuner(
        tune.with_resources(trial, get_tune_resources("ddp", workers=2)),
        param_space={"epochs": 2},
        run_config=tune.RunConfig(storage_path=sys.argv[1], name="namespace", verbose=0),
    )
    [result] = tuner.fit()
    namespaces = [name for name in ("pytorch_lightning", "lightning.pytorch") if name in sys.modules]
    report = {"error": str(result.error), "iterations": list(result.metrics_dataframe["training_iteration"])}
    print("REPORT " + json.dumps({**report, "namespaces": namespaces}))
