"""Every use of Lightning's private API in raylane, and nowhere else.

Lightning has no public way to replace how a strategy starts its processes, so the launcher plugs into the private
``_Launcher`` interface and ``Strategy._configure_launcher``. ``tests/test_lightning_contract.py`` checks each name used
here against the installed Lightning, so a release that changes one fails that test by name instead of breaking users.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pytorch_lightning.strategies.launchers.launcher import _Launcher

if TYPE_CHECKING:
    import pytorch_lightning as pl

Launcher = _Launcher
"""Base class of a strategy's process launcher: ``launch(function, *args, trainer=..., **kwargs)`` and ``kill``."""


class LauncherSlot:
    """Mixin for a Lightning strategy: installs the launcher ``make_launcher()`` returns.

    Lightning's accelerator connector calls ``_configure_launcher`` once the strategy is fully set up, then hands each
    entry point (fit, validate, test, predict) to ``strategy.launcher.launch``.
    """

    _launcher: Any

    def make_launcher(self) -> _Launcher:
        raise NotImplementedError

    def _configure_launcher(self) -> None:
        self._launcher = self.make_launcher()


def with_ckpt_path(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ckpt_path: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of a Trainer entry point (``Trainer._fit_impl``) with ``ckpt_path`` replaced, to resume a fit."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.arguments["ckpt_path"] = ckpt_path
    return bound.args, bound.kwargs


def predict_batch_indices(trainer: pl.Trainer) -> list[list[list[int]]]:
    """Dataset indices of every batch this process predicted, per dataloader.

    Lightning wraps predict dataloaders' batch samplers to record the indices they yield.
    """
    return [
        [list(batch) for batch in getattr(dataloader.batch_sampler, "seen_batch_indices", [])]
        for dataloader in _predict_dataloaders(trainer)
    ]


def _predict_dataloaders(trainer: pl.Trainer) -> list[Any]:
    dataloaders = trainer.predict_dataloaders
    if isinstance(dataloaders, dict):
        return list(dataloaders.values())
    if isinstance(dataloaders, (list, tuple)):
        return list(dataloaders)
    return [] if dataloaders is None else [dataloaders]


def predict_batch_sizes(trainer: pl.Trainer) -> list[int | None]:
    """The batch size of each predict dataloader (None where a custom batch sampler decides)."""
    return [getattr(dataloader, "batch_size", None) for dataloader in _predict_dataloaders(trainer)]
