"""The workload of the memory benchmarks (``sharded_memory.py``, ``fsdp_memory.py``): a wide MLP with Adam on
generated data. Imported by name on the workers too (raylane gives them the driver's ``sys.path``)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

QUIET: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "logger": False,
    "enable_model_summary": False,
}


class WideMLP(pl.LightningModule):
    """``layers`` square linear layers of ``width`` and a head: equal-sized tensors, so whole-tensor sharding (OSS)
    balances them and FSDP makes one unit of each."""

    def __init__(self, width: int, layers: int, classes: int = 10, lr: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        blocks: list[nn.Module] = []
        for _ in range(layers):
            blocks += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(inputs))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class SyntheticData(pl.LightningDataModule):
    """Generated on every worker from the same seed, so no configuration pays for shipping data."""

    def __init__(self, samples: int, width: int, batch_per_worker: int) -> None:
        super().__init__()
        self.samples, self.width, self.batch_per_worker = samples, width, batch_per_worker

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(self.samples, self.width, generator=generator)
        self.train_set = TensorDataset(inputs, torch.randint(0, 10, (self.samples,), generator=generator))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_per_worker, shuffle=True)
