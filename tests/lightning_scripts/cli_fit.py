"""A LightningCLI script, as a user writes one: ``python cli_fit.py NAMESPACE fit --config ... --trainer.strategy ...``.

After the fit it prints a JSON line with what the driver got back from the workers.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

pl = importlib.import_module(sys.argv[1])
cli_module = importlib.import_module(f"{sys.argv[1]}.cli")


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.layer = torch.nn.Linear(4, 1)
        self.initial_weight = self.layer.weight.detach().clone()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, target = batch
        loss = torch.nn.functional.mse_loss(self.layer(features), target)
        self.log("world_size", float(self.trainer.world_size))
        self.log("worker_pid", float(os.getpid()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(64, 4, generator=generator)
        return DataLoader(TensorDataset(features, features.sum(dim=1, keepdim=True)), batch_size=8)


def main() -> None:
    cli = cli_module.LightningCLI(Regressor, args=sys.argv[2:])
    trainer, model = cli.trainer, cli.model
    report = {
        "strategy_class": type(trainer.strategy).__qualname__,
        "workers": trainer.strategy.launch_options.workers,
        "backend_options": dict(trainer.strategy.backend_options),
        "world_size": float(trainer.callback_metrics["world_size"]),
        "trained_elsewhere": int(trainer.callback_metrics["worker_pid"]) != os.getpid(),
        "weights_moved": float((model.layer.weight.detach() - model.initial_weight).abs().sum()),
        "max_epochs": trainer.max_epochs,
        "current_epoch": trainer.current_epoch,
    }
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
