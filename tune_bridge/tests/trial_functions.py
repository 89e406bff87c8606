"""What the Tune tests run inside trials: one trial function and a model that records what rank 0 saw.

Ray ships this module by value (see conftest.py), so trial processes and raylane workers need not find the tests
folder on their ``sys.path``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from ray import tune

from raylane import get_strategy
from raylane.testing import ClassifierModel, make_loader, quiet_trainer
from raylane_tune import TuneReportCallback, TuneReportCheckpointCallback

WORKERS = 2
SAMPLES = 32  # 4 batches of 8: 2 optimiser steps per epoch on each of 2 workers
STEPS_PER_EPOCH = SAMPLES // 8 // WORKERS
REPORTED = {"loss": "val_loss", "rank_marker": "rank_marker"}


class RecordingModel(ClassifierModel):
    """Logs a value that differs on every rank, and writes down (rank 0) what it logged at each validation."""

    def __init__(self, record: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record = record

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        # Not synchronised: each rank logs its own value, so the report shows whose metrics Tune got.
        self.log("rank_marker", float(100 * self.global_rank + self.current_epoch))

    def on_train_start(self) -> None:
        super().on_train_start()
        start = {"event": "train_start", "global_step": self.global_step, "pid": os.getpid()}
        self._write({**start, "world_size": self.trainer.world_size})

    def on_train_epoch_start(self) -> None:
        self._write({"event": "train_epoch", "epoch": self.current_epoch})

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            metrics = self.trainer.callback_metrics
            self._write(
                {
                    "event": "validation",
                    "epoch": self.current_epoch,
                    **{k: float(metrics[k]) for k in REPORTED.values()},
                }
            )

    def _write(self, entry: dict[str, Any]) -> None:
        if self.global_rank == 0:  # on the driver (failures) too: its Trainer describes rank 0
            with open(self.record, "a", encoding="utf-8") as record:
                record.write(json.dumps(entry) + "\n")


def fit_trial(config: dict[str, Any]) -> None:
    """Train ``config["epochs"]`` epochs on 2 raylane workers (or, with ``plain``, in the trial's own process).

    ``fail_at_epoch``: rank 1 (or ``fail_on_rank``) raises at the first step of that epoch, in a trial's first attempt
    only (a trial that restarts from its checkpoint then succeeds). ``checkpoint``: report with checkpoints (default)
    or metrics only.
    ``report_all``: report every logged metric instead of :data:`REPORTED` (plus ``extra_metrics``).
    ``raylane_max_failures``: raylane restarts the fit itself (the failure is injected once per trial), from the
    ModelCheckpoint that ``checkpoint_every_n_epochs`` adds. ``workers_range``: an elastic strategy,
    ``workers=(min, max)``, instead of :data:`WORKERS` workers.
    """
    record_dir = Path(config["record_dir"])
    trial_id = tune.get_context().get_trial_id()
    record = str(record_dir / f"{trial_id}.jsonl")
    pl.seed_everything(0, verbose=False)  # every trial starts from the same weights: only its config differs
    resume_from = tune.get_checkpoint()
    failing = config.get("fail_at_epoch") is not None and resume_from is None
    restarts = config.get("raylane_max_failures", 0)
    model = RecordingModel(
        record,
        lr=config.get("lr", 0.1),
        fail_on_rank=config.get("fail_on_rank", 1) if failing else None,
        fail_at_step=STEPS_PER_EPOCH * (config.get("fail_at_epoch") or 0),
        fail_once_marker=str(record_dir / f"{trial_id}.failed") if restarts else None,
    )
    metrics = None if config.get("report_all") else {**REPORTED, **config.get("extra_metrics", {})}
    report = (
        TuneReportCheckpointCallback(metrics, filename="model.ckpt")
        if config.get("checkpoint", True)
        else TuneReportCallback(metrics)
    )
    callbacks: list[pl.Callback] = [report]
    if config.get("checkpoint_every_n_epochs"):
        every = config["checkpoint_every_n_epochs"]
        callbacks.append(ModelCheckpoint(record_dir / trial_id, every_n_epochs=every, save_top_k=-1))
    if config.get("plain"):
        placement: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
    else:
        placement = {
            "strategy": get_strategy(
                "ddp",
                workers=tuple(config.get("workers_range", ())) or WORKERS,
                cpus_per_worker=config.get("cpus_per_worker", 1),
                max_failures=restarts,
            )
        }
    trainer = quiet_trainer(
        max_epochs=config["epochs"],
        callbacks=callbacks,
        default_root_dir=str(record_dir),
        enable_checkpointing=len(callbacks) > 1,
        **placement,
    )
    started = time.time()
    loaders = (make_loader(8, samples=SAMPLES), make_loader(8, samples=SAMPLES))
    try:
        if resume_from is None:
            trainer.fit(model, *loaders)
        else:
            with resume_from.as_directory() as directory:
                trainer.fit(model, *loaders, ckpt_path=os.path.join(directory, "model.ckpt"))
    except BaseException as err:  # SystemExit too: how Tune ends a trial's thread when a scheduler stops it
        event = "failed" if isinstance(err, Exception) else "interrupted"
        model._write({"event": event, "after_s": time.time() - started, "error": f"{type(err).__name__}: {err}"})
        raise
    with open(record_dir / f"{trial_id}.times.json", "w", encoding="utf-8") as times:
        json.dump({"start": started, "end": time.time()}, times)


def trial_function() -> Callable[[dict[str, Any]], None]:
    """A new function running :func:`fit_trial`: ``tune.with_resources`` sets its resources as an attribute of the
    function it wraps, so tests that size trials differently must not share one function object."""

    def trial(config: dict[str, Any]) -> None:
        fit_trial(config)

    return trial


def read_record(record_dir: Path, trial_id: str) -> list[dict[str, Any]]:
    path = record_dir / f"{trial_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_times(record_dir: Path, trial_id: str) -> tuple[float, float]:
    times = json.loads((record_dir / f"{trial_id}.times.json").read_text())
    return times["start"], times["end"]
