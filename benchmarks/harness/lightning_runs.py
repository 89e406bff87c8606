"""The configurations that drive ``pytorch_lightning`` directly: one process, Lightning's ddp_spawn, and raylane."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from harness.report import RunResult
from harness.timer import LoopTimer, measured
from harness.workload import EXAMPLES_DIR, PROCESSES, Workload, synthetic_digits

if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))  # the example's model module, found as a user's script would find it
from digits import DigitsClassifier

CONFIGS = ("one_process", "ddp_spawn", "raylane")

# Progress bars, checkpoints, loggers and the model summary would be timed along with the training.
QUIET_TRAINER: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "logger": False,
    "enable_model_summary": False,
}


class SyntheticDigits(pl.LightningDataModule):
    """The workload's data, generated in ``setup`` on every process from the same seed."""

    def __init__(self, samples: int, seed: int, batch_size: int) -> None:
        super().__init__()
        self.samples = samples
        self.seed = seed
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train_set = synthetic_digits(self.samples, self.seed)
        self.test_set = synthetic_digits(max(1, self.samples // 4), self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


def processes(config: str) -> int:
    return 1 if config == "one_process" else PROCESSES


def trainer_flags(config: str, **raylane_options: Any) -> dict[str, Any]:
    """The Trainer arguments that make each configuration what it is; everything else is shared."""
    if config == "one_process":
        return {"accelerator": "cpu", "devices": 1}
    if config == "ddp_spawn":
        return {"strategy": "ddp_spawn", "accelerator": "cpu", "devices": PROCESSES}
    if config == "raylane":
        # Imported here: a ddp_spawn script does not import raylane (nor Ray), as a plain Lightning user's would not.
        from raylane import get_strategy

        # Ray Train's configuration imports lightning.pytorch too; these Trainers are pytorch_lightning's.
        options = {"workers": PROCESSES, "lightning": "pytorch_lightning", **raylane_options}
        return {"strategy": get_strategy("ddp", **options), "accelerator": "cpu"}
    raise ValueError(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")


def run(config: str, workload: Workload, one_process_threads: int | None = None) -> RunResult:
    """Train once from the same seed and time ``trainer.fit()`` as the caller sees it.

    ``one_process_threads`` sets torch's threads for ``one_process`` only (it runs in this process); ``None`` keeps
    torch's default. The other configurations' processes choose their own: one thread each, from Lightning or Ray.
    """
    trainer, model, data = build(config, workload)
    default_threads = torch.get_num_threads()
    if config == "one_process" and one_process_threads is not None:
        torch.set_num_threads(one_process_threads)
    try:
        started_at, start = time.time(), time.perf_counter()
        trainer.fit(model, datamodule=data)
        fit_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(default_threads)
        release_workers(trainer)
    return RunResult.from_metrics(fit_s, measured(trainer.callback_metrics), started_at)


def build(
    config: str, workload: Workload, callbacks: Sequence[pl.Callback] = (), **raylane_options: Any
) -> tuple[pl.Trainer, DigitsClassifier, SyntheticDigits]:
    """The Trainer, model and data of one run, seeded; ``raylane_options`` go to ``get_strategy`` for raylane
    (``workers`` included: the global batch is split over them)."""
    pl.seed_everything(workload.seed, verbose=False)
    model = DigitsClassifier(hidden=workload.hidden)
    batch = workload.batch_per_process(raylane_options.get("workers", processes(config)))
    data = SyntheticDigits(workload.samples, workload.seed, batch)
    flags = trainer_flags(config, **raylane_options)
    trainer = pl.Trainer(max_epochs=workload.epochs, callbacks=[LoopTimer(), *callbacks], **QUIET_TRAINER, **flags)
    return trainer, model, data


def release_workers(trainer: pl.Trainer) -> None:
    """Stop raylane's workers, which it keeps warm for a next entry point, before the next configuration runs.

    Idle workers would give way to Ray Train's placement group by themselves, but releasing them here makes every
    configuration start from the same state. Called after the timing: fit() returns first.
    """
    release = getattr(trainer.strategy, "release_workers", None)
    if release is not None:
        release()
