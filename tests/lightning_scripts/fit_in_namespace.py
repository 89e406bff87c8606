"""A user's script for one Lightning namespace: ``python fit_in_namespace.py lightning.pytorch BACKEND``.

It imports only that namespace, asks for ``get_strategy(BACKEND, workers=2)`` without saying which Lightning (raylane
must find out), fits, and prints a JSON line with what the driver got back.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

pl = importlib.import_module(sys.argv[1])
from raylane import get_strategy  # noqa: E402  (after Lightning, as a user's script would)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, target = batch
        loss = torch.nn.functional.mse_loss(self.layer(features), target)
        self.log("world_size", float(self.trainer.world_size))
        self.log("worker_pid", float(os.getpid()))
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    torch.manual_seed(0)
    features = torch.randn(64, 4)
    data = DataLoader(TensorDataset(features, features.sum(dim=1, keepdim=True)), batch_size=8)
    model = Regressor()
    before = model.layer.weight.detach().clone()
    strategy = get_strategy(sys.argv[2], workers=2)
    trainer = pl.Trainer(
        max_epochs=2, strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, data)
    report = {
        "strategy_is_lightnings": isinstance(strategy, pl.strategies.Strategy),
        "strategy_class": type(strategy).__qualname__,
        "weights_moved": float((model.layer.weight.detach() - before).abs().sum()),
        "world_size": float(trainer.callback_metrics["world_size"]),
        "trained_elsewhere": int(trainer.callback_metrics["worker_pid"]) != os.getpid(),
        "global_step": trainer.global_step,
        "state": str(trainer.state.status.value),
        "namespaces_imported": [name for name in ("pytorch_lightning", "lightning.pytorch") if name in sys.modules],
    }
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
