"""A Tune trial that trains on Ray Datasets: one created inside the trainable, one passed in with
``tune.with_parameters``; each epoch's rows reach the trial's workers exactly once and every epoch is reported."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import cloudpickle, tune

from raylane import get_strategy
from raylane.data import from_ray
from raylane.testing import assert_released, quiet_trainer
from raylane.testing.ray_data import RowRecordingModel, make_ray_dataset, rows_seen
from raylane_tune import TuneReportCallback, get_tune_resources

pytestmark = pytest.mark.timeout(300)

WORKERS, EPOCHS, ROWS = 2, 2, 32


@pytest.fixture
def by_value(local_ray: None) -> Iterator[None]:
    # Trial processes cannot import this test module; Ray ships it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def train_on_ray_data(config: dict[str, Any], val: Any = None) -> None:
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        strategy=get_strategy("ddp", workers=WORKERS),
        callbacks=[TuneReportCallback({"loss": "val_loss"}, on="validation_end")],
        enable_checkpointing=False,
    )
    train = make_ray_dataset(ROWS)  # created inside the trial
    model = RowRecordingModel(report_dir=config["report_dir"])
    trainer.fit(model, from_ray(train, batch_size=8), from_ray(val, batch_size=8))


def test_a_trial_streams_datasets_made_inside_it_and_passed_in(by_value: None, tmp_path: Path) -> None:
    analysis = tune.run(
        tune.with_parameters(train_on_ray_data, val=make_ray_dataset(16)),
        resources_per_trial=get_tune_resources(get_strategy("ddp", workers=WORKERS)),
        config={"report_dir": str(tmp_path)},
        metric="loss",
        mode="min",
        storage_path=str(tmp_path / "storage"),
        name="ray-data",
        verbose=0,
    )
    [trial] = analysis.trials
    assert trial.status == "TERMINATED", trial.error_file
    assert trial.last_result["training_iteration"] == EPOCHS
    reports = rows_seen(tmp_path)
    for epoch in range(EPOCHS):
        assert sorted(row for report in reports for row in report[f"fit-epoch{epoch}"]) == list(range(ROWS))
        assert sorted(row for report in reports for row in report[f"val-run{epoch}"]) == list(range(16))
    assert_released()
