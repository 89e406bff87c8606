"""A small MLP for scikit-learn's handwritten digits, and the data module that feeds it.

It lives in its own module, next to ``train_digits.py``, on purpose: the Ray workers unpickle the model, so they must
import this module just as the driver did. raylane gives the workers the driver's ``sys.path`` for that, so a user's
modules next to their script work without packaging them.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

NUM_FEATURES = 64  # 8x8 grey-level images, flattened
NUM_CLASSES = 10

Batch = tuple[Tensor, Tensor]


class DigitsClassifier(pl.LightningModule):
    """Two linear layers: about 97% on digits, and small enough to train in seconds on a laptop CPU."""

    def __init__(
        self, hidden: int = 128, lr: float = 3e-3, in_features: int = NUM_FEATURES, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # recorded in checkpoints, so a checkpoint rebuilds the same network
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        features, labels = batch
        loss = F.cross_entropy(self(features), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Batch, stage: str) -> None:
        features, labels = batch
        logits = self(features)
        # Each rank scores only its shard of the split; sync_dist averages over ranks so the figure covers all of it.
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log(f"{stage}_acc", (logits.argmax(dim=1) == labels).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsDataModule(pl.LightningDataModule):
    """The 1,797 digits, standardised and split 80/20 with a fixed seed.

    Every worker runs ``setup`` itself and must get the same split, hence the seed. Nothing is tuned on the validation
    scores, so the held-out 20% serves both to watch training (``val_acc``) and for the final ``test_acc``.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        features, labels = load_digits(return_X_y=True)
        train_x, test_x, train_y, test_y = train_test_split(
            features, labels, test_size=0.2, random_state=self.seed, stratify=labels
        )
        scaler = StandardScaler().fit(train_x)  # fitted on the training part only, so no test statistics leak in
        self.train_set = _dataset(scaler.transform(train_x), train_y)
        self.test_set = _dataset(scaler.transform(test_x), test_y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


def _dataset(features: object, labels: object) -> TensorDataset:
    return TensorDataset(torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.long))
