"""Times the training loop on rank 0, so that start-up cost and training speed can be told apart.

``trainer.fit()`` time includes starting the processes (and, on Ray, the actors); the loop time does not. The figures
travel back in rank 0's ``callback_metrics``, which every launcher compared here returns to the driver.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

LOOP_S = "train_loop_s"
THREADS = "train_threads"  # torch's intra-op threads per process: launchers choose differently, and it matters


class LoopTimer(pl.Callback):
    """Seconds from ``on_train_start`` (processes up, model wrapped) to ``on_train_end``, and torch's thread count."""

    def __init__(self) -> None:
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics[LOOP_S] = torch.tensor(time.perf_counter() - self._start)
        trainer.callback_metrics[THREADS] = torch.tensor(float(torch.get_num_threads()))


def measured(callback_metrics: Mapping[str, Any]) -> dict[str, float]:
    """What one run reports besides its fit time: loop seconds, threads per process and the last training loss."""
    return {name: float(callback_metrics[name]) for name in (LOOP_S, THREADS, "train_loss")}
