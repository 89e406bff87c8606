"""The report callbacks outside Tune, and what their arguments accept."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl

from raylane import ConfigurationError, get_strategy
from raylane.testing import ClassifierModel, assert_released, make_loader, quiet_trainer
from raylane_tune import NotInTuneWarning, TuneReportCallback, TuneReportCheckpointCallback
from raylane_tune.callbacks import REPORT_HOOKS

CALLBACKS = [TuneReportCallback, TuneReportCheckpointCallback]


def _trainer(root: Path, callback: pl.Callback, **flags: object) -> pl.Trainer:
    return quiet_trainer(
        max_epochs=2, callbacks=[callback], default_root_dir=str(root), enable_checkpointing=False, **flags
    )


def _scratch(callback: pl.Callback) -> Path:
    # Where a checkpoint for Tune would have been written before relaying it.
    return Path(tempfile.gettempdir()) / "raylane_tune" / callback.sender_id  # type: ignore[attr-defined]


@pytest.mark.parametrize("callback_class", CALLBACKS)
def test_outside_tune_a_trainer_warns_once_and_reports_nothing(tmp_path: Path, callback_class: type) -> None:
    callback = callback_class({"loss": "val_loss"})
    trainer = _trainer(tmp_path, callback, accelerator="cpu", devices=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ClassifierModel(), make_loader(8, samples=32), make_loader(8, samples=32))
    ours = [warning for warning in caught if issubclass(warning.category, NotInTuneWarning)]
    assert len(ours) == 1, "once per callback, not once per epoch"
    assert "outside a Ray Tune trial" in str(ours[0].message)
    assert not _scratch(callback).exists(), "no checkpoint is saved when nobody can receive it"
    assert trainer.current_epoch == 2


@pytest.mark.timeout(180)
def test_outside_tune_raylane_workers_report_nothing(
    local_ray: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = TuneReportCheckpointCallback({"loss": "val_loss"})
    trainer = _trainer(tmp_path, callback, strategy=get_strategy("ddp", workers=2))
    with caplog.at_level(logging.WARNING, logger="raylane_tune"):
        trainer.fit(ClassifierModel(), make_loader(8, samples=32), make_loader(8, samples=32))
    assert trainer.current_epoch == 2 and "val_loss" in trainer.callback_metrics
    assert not _scratch(callback).exists()
    relayed = [record for record in caplog.records if record.name.startswith("raylane_tune")]
    assert not relayed, "nothing may be relayed to a driver that runs no trial"
    trainer.strategy.release_workers()  # type: ignore[attr-defined]  # they stay warm for a next entry point
    assert_released()  # the core reserved its own placement group (no trial to join) and released it


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        (None, None),
        ("val_loss", {"val_loss": "val_loss"}),
        (["val_loss", "acc"], {"val_loss": "val_loss", "acc": "acc"}),
        (("val_loss",), {"val_loss": "val_loss"}),
        ({"loss": "val_loss"}, {"loss": "val_loss"}),
    ],
)
def test_metrics_map_reported_names_to_logged_names(metrics: object, expected: object) -> None:
    for callback_class in CALLBACKS:
        assert callback_class(metrics).metrics == expected


@pytest.mark.parametrize("metrics", [[], {}, 3, ["val_loss", 1], {"loss": 2}])
def test_invalid_metrics_are_rejected(metrics: object) -> None:
    with pytest.raises(ConfigurationError, match="metrics must be"):
        TuneReportCallback(metrics)  # type: ignore[arg-type]


def test_on_accepts_lightning_hook_names() -> None:
    assert TuneReportCallback(on="train_epoch_end").on == ("train_epoch_end",)
    assert TuneReportCallback(on=["train_epoch_end", "validation_end"]).on == ("train_epoch_end", "validation_end")
    assert {"validation_end", "train_epoch_end", "train_batch_end", "fit_end", "test_end"} <= set(REPORT_HOOKS)


@pytest.mark.parametrize("on", ["on_validation_end", "validation_ends", "save_checkpoint", "exception", []])
def test_invalid_hooks_are_rejected_with_the_choices(on: object) -> None:
    with pytest.raises(ConfigurationError, match="validation_end, validation_epoch_end"):
        TuneReportCallback(on=on)  # type: ignore[arg-type]


@pytest.mark.parametrize("filename", ["", "dir/model.ckpt", "../model.ckpt", 3])
def test_checkpoint_filename_must_be_a_plain_name(filename: object) -> None:
    with pytest.raises(ConfigurationError, match="plain file name"):
        TuneReportCheckpointCallback(filename=filename)  # type: ignore[arg-type]
