"""The Lightning callbacks that report to Ray Tune. They run where Lightning runs: inside raylane's workers.

Rank 0 relays its metrics (and checkpoint bytes) to the trial's driver with :func:`raylane.relay.send`; the driver
reports them to Tune (:mod:`raylane_tune.reporting`). A Trainer without raylane running in the trial's own process
reports directly. Anywhere else the callbacks warn once and do nothing.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from raylane import _lightning, relay
from raylane.errors import ConfigurationError
from raylane_tune import _ray_tune, plugin
from raylane_tune.reporting import REPORT_TOPIC, TuneReport, read_tree, report_to_tune

log = logging.getLogger(__name__)


def _users_lightning() -> ModuleType:
    """The Lightning the user's Trainer comes from (see ``raylane._lightning.imported_namespace``); pytorch_lightning
    when raylane cannot tell.

    Lightning calls callback hooks by name, so either namespace's Trainer runs these callbacks; importing the other
    namespace here would only make ``get_strategy`` unable to tell which one the user trains with.
    """
    try:
        return _lightning.namespace(_lightning.imported_namespace())
    except ConfigurationError:
        return importlib.import_module("pytorch_lightning")


pl = _users_lightning()

# Hooks that are not training events, or that would recurse (saving a checkpoint calls on_save_checkpoint).
_NOT_EVENTS = {"on_save_checkpoint", "on_load_checkpoint", "on_exception"}
REPORT_HOOKS = tuple(
    sorted(name[3:] for name in vars(pl.Callback) if name.startswith("on_") and name not in _NOT_EVENTS)
)
"""What ``on=`` accepts: Lightning's callback hooks without the ``on_`` prefix, e.g. ``"validation_end"``."""

Metrics = str | Sequence[str] | Mapping[str, str] | None


class NotInTuneWarning(UserWarning):
    """A report callback ran where no Ray Tune trial can receive its reports."""


def _report_on_hooks(cls: type[_TuneCallback]) -> type[_TuneCallback]:
    """Give the class one method per reportable Lightning hook; each reports when its hook was chosen with ``on=``."""

    def make_hook(hook: str) -> Callable[..., None]:
        def on_hook(
            self: _TuneCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any, **__: Any
        ) -> None:
            if hook in self.on:
                self._report(trainer, hook)

        on_hook.__name__ = on_hook.__qualname__ = f"on_{hook}"
        return on_hook

    for hook in REPORT_HOOKS:
        setattr(cls, f"on_{hook}", make_hook(hook))
    return cls


@_report_on_hooks
class _TuneCallback(pl.Callback):
    saves_checkpoints = False

    def __init__(self, metrics: Metrics = None, on: str | Sequence[str] = "validation_end") -> None:
        self.metrics = _metric_names(metrics)
        self.on = _hook_names(on)
        self.filename = "checkpoint"
        self._warned: set[str] = set()
        # Names this callback's reports and scratch files; the same on every rank, since the Trainer travels pickled.
        self.sender_id = uuid.uuid4().hex
        # On the driver: what this Trainer already reported. A fit that raylane restarts from an older checkpoint
        # replays some epochs; their reports would be duplicate Tune iterations.
        self.reported: set[tuple[str, int, int]] = set()

    def _report(self, trainer: pl.Trainer, hook: str) -> None:
        if trainer.sanity_checking:
            return  # Lightning's sanity check is not an evaluation of the trial
        send = self._destination()
        if send is None:
            self._warn_once(
                trainer,
                "outside",
                f"{type(self).__name__} reports nothing: this Trainer runs outside a Ray Tune trial. Call "
                "trainer.fit inside the function that Tuner/tune.run runs.",
                NotInTuneWarning,
            )
            return
        # Every rank takes the same path (the metric names are the same on every rank), so the checkpoint, which some
        # strategies gather collectively, is saved by all ranks or by none.
        metrics = self._metric_values(trainer)
        if not metrics:
            return
        files = self._save_checkpoint(trainer) if self.saves_checkpoints else None
        if trainer.global_rank == 0:
            origin = f"on_{hook} at epoch {trainer.current_epoch}, step {trainer.global_step}"
            progress = (hook, trainer.current_epoch, trainer.global_step)
            send(TuneReport(metrics, files, origin, progress=progress, sender=self.sender_id))

    @staticmethod
    def _destination() -> Callable[[TuneReport], Any] | None:
        if plugin.in_trial_worker():
            return _relay
        if _ray_tune.in_tune_trial():
            return report_to_tune  # a Trainer without raylane, in the trial's own process
        return None

    def _metric_values(self, trainer: pl.Trainer) -> dict[str, float]:
        logged = trainer.callback_metrics
        names = self.metrics if self.metrics is not None else {name: name for name in logged}
        values = {}
        for report_name, logged_name in names.items():
            if logged_name in logged:
                values[report_name] = _to_float(logged[logged_name])
            else:
                self._warn_once(
                    trainer,
                    f"missing:{logged_name}",
                    f"{type(self).__name__}: metric {logged_name!r} is not in trainer.callback_metrics (logged: "
                    f"{', '.join(sorted(logged)) or 'nothing yet'}); it is left out of the report.",
                )
        return values

    def _save_checkpoint(self, trainer: pl.Trainer) -> dict[str, bytes] | None:
        # One directory per callback and node; every rank of the run uses the same path.
        directory = Path(tempfile.gettempdir()) / "raylane_tune" / self.sender_id
        directory.mkdir(parents=True, exist_ok=True)
        # Every rank calls it: DDP writes on rank 0 only, sharded strategies write every rank's part.
        trainer.save_checkpoint(directory / self.filename)
        files = read_tree(directory / self.filename) if trainer.global_rank == 0 else None
        # Removed at once, on every node: a trial that a scheduler stops never reaches a teardown hook, and its
        # workers are killed. The barrier keeps another rank on rank 0's node from removing it before rank 0 read it.
        trainer.strategy.barrier("raylane_tune.checkpoint_read")
        if trainer.local_rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
        return files

    def _warn_once(self, trainer: pl.Trainer, key: str, message: str, category: type[Warning] = UserWarning) -> None:
        if trainer.global_rank == 0 and key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=2)


class TuneReportCallback(_TuneCallback):
    """Report rank 0's metrics to Ray Tune at the chosen Lightning hooks, for schedulers such as ASHA.

    ``metrics``: ``None`` reports every entry of ``trainer.callback_metrics``; a name or a list of names reports those
    under the same names; a dict ``{"reported_name": "logged_name"}`` renames. A name that was not logged is left out
    with a warning. ``on``: one hook name or a list (``"validation_end"``, ``"train_epoch_end"`` ...; see
    :data:`REPORT_HOOKS`). Each report is one Tune ``training_iteration``; the sanity check is never reported.
    """


class TuneReportCheckpointCallback(_TuneCallback):
    """Like :class:`TuneReportCallback`, and each report carries a checkpoint of the Trainer.

    The checkpoint is ``trainer.save_checkpoint`` into the file ``filename`` of the reported ``ray.tune.Checkpoint``
    directory; load it with ``Model.load_from_checkpoint`` or resume with ``trainer.fit(..., ckpt_path=...)``.
    """

    saves_checkpoints = True

    def __init__(
        self, metrics: Metrics = None, filename: str = "checkpoint", on: str | Sequence[str] = "validation_end"
    ) -> None:
        super().__init__(metrics, on)
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ConfigurationError(f"filename must be a plain file name such as 'checkpoint', got {filename!r}.")
        self.filename = filename


def deliver(trainer: pl.Trainer, message: TuneReport) -> None:
    """*Driver.* Report what rank 0 relayed, unless this Trainer reported it before a restart already."""
    senders = (cb for cb in trainer.callbacks if isinstance(cb, _TuneCallback) and cb.sender_id == message.sender)
    callback = next(senders, None)
    if callback is not None and message.progress is not None:
        if message.progress in callback.reported:
            log.info("raylane_tune: %s was reported before the restart; not reporting it again.", message.origin)
            return
        callback.reported.add(message.progress)
    report_to_tune(message)


def _relay(message: TuneReport) -> None:
    if not relay.send(REPORT_TOPIC, message):
        log.warning(
            "raylane_tune could not relay a report from %s: this worker has no relay to its driver.", message.origin
        )


def _metric_names(metrics: Metrics) -> dict[str, str] | None:
    if metrics is None:
        return None
    if isinstance(metrics, str):
        return {metrics: metrics}
    if isinstance(metrics, Mapping):
        names = dict(metrics)
    elif isinstance(metrics, Sequence):
        names = {name: name for name in metrics}
    else:
        names = {}
    if not names or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ConfigurationError(
            "metrics must be None (every logged metric), a logged name, a list of them, or a dict "
            f"{{'reported_name': 'logged_name'}}; got {metrics!r}."
        )
    return names


def _hook_names(on: str | Sequence[str]) -> tuple[str, ...]:
    hooks = (on,) if isinstance(on, str) else tuple(on)
    unknown = [hook for hook in hooks if hook not in REPORT_HOOKS]
    if not hooks or unknown:
        raise ConfigurationError(
            f"on={on!r}: not Lightning callback hooks (without 'on_'). Choose from: {', '.join(REPORT_HOOKS)}."
        )
    return hooks


def _to_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
