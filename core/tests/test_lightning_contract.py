"""Fails by name when a Lightning release changes a private API raylane depends on (all of it is in raylane._lightning).

If one of these fails after a Lightning upgrade, adapt raylane/_lightning.py; nothing else in raylane reaches into
Lightning's internals.
"""

from __future__ import annotations

import inspect

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.launcher import _Launcher
from torch.utils.data import DataLoader, TensorDataset

from raylane import _lightning


def test_launcher_interface_is_what_the_ray_launcher_implements() -> None:
    assert _lightning.Launcher is _Launcher
    abstract = set(getattr(_Launcher, "__abstractmethods__", set()))
    assert abstract == {"launch", "kill", "is_interactive_compatible"}, abstract
    params = list(inspect.signature(_Launcher.launch).parameters)
    assert params[:2] == ["self", "function"]


def test_strategies_build_their_launcher_in_configure_launcher() -> None:
    assert callable(getattr(DDPStrategy, "_configure_launcher", None))

    class Probe(_lightning.LauncherSlot, DDPStrategy):
        built = 0

        def make_launcher(self) -> _Launcher:
            Probe.built += 1
            return None  # type: ignore[return-value]

    pl.Trainer(strategy=Probe(), accelerator="cpu", logger=False)
    assert Probe.built == 1, "Lightning no longer calls Strategy._configure_launcher while building the Trainer"


class _Predictor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0])


def test_predict_records_the_sample_indices_of_each_batch() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.predict(_Predictor(), DataLoader(TensorDataset(torch.randn(5, 2)), batch_size=2))
    assert _lightning.predict_batch_indices(trainer) == [[[0, 1], [2, 3], [4]]]
