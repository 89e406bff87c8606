"""Times the training loop on rank 0, so that start-up cost and training speed can be told apart.

``trainer.fit()`` time includes starting the processes (and, on Ray, the actors); the loop time does not. The figures
travel back in rank 0's ``callback_metrics``, which every launcher compared here returns to the driver.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

LOOP_S = "train_loop_s"
THREADS = "train_threads"  # torch's intra-op threads per process: launchers choose differently, and it matters
# Wall-clock time (time.time()) when the last rank finished its first optimizer step: start-up ends there.
FIRST_STEP_AT = "first_step_at"
TEST_LOOP_S = "test_loop_s"
STEP_S = "step_s"  # median seconds between the ends of consecutive training steps, after WARM_UP_STEPS
WARM_UP_STEPS = 10


class LoopTimer(pl.Callback):
    """Seconds from ``on_train_start`` (processes up, model wrapped) to ``on_train_end``, torch's thread count, and
    when every rank had taken its first optimizer step.

    Wall-clock marks compare across processes of one machine, so the driver can subtract its own ``fit()`` start.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._first_step_at: float | None = None
        self._test_start = 0.0
        self._step_ends: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._step_ends.append(time.perf_counter())
        if self._first_step_at is None:
            self._first_step_at = time.time()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics[LOOP_S] = torch.tensor(time.perf_counter() - self._start)
        trainer.callback_metrics[THREADS] = torch.tensor(float(torch.get_num_threads()))
        steps = [end - start for start, end in zip(self._step_ends, self._step_ends[1:])][WARM_UP_STEPS:]
        trainer.callback_metrics[STEP_S] = torch.tensor(statistics.median(steps) if steps else float("nan"))
        # float64: a float32 time.time() is only good to about 2 minutes.
        mark = torch.tensor([self._first_step_at or time.time()], dtype=torch.float64, device=pl_module.device)
        trainer.callback_metrics[FIRST_STEP_AT] = trainer.strategy.all_gather(mark).max().cpu()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._test_start = time.perf_counter()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics[TEST_LOOP_S] = torch.tensor(time.perf_counter() - self._test_start)


def measured(callback_metrics: Mapping[str, Any]) -> dict[str, float]:
    """What one run reports besides its fit time: loop seconds, threads per process, the last training loss and when
    the last rank's first step ended, and the median step time."""
    return {name: float(callback_metrics[name]) for name in (LOOP_S, THREADS, "train_loss", FIRST_STEP_AT, STEP_S)}
