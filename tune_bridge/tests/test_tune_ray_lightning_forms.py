"""ray_lightning's Tune call forms keep working: get_tune_resources(num_workers, num_cpus_per_worker, use_gpu), the
report callbacks' positional arguments, and its README's tune.run example with raylane.compat.RayStrategy."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from ray import cloudpickle, tune

from raylane import ConfigurationError
from raylane.compat import RayStrategy
from raylane.testing import ClassifierModel, assert_released, make_loader
from raylane_tune import TuneReportCallback, TuneReportCheckpointCallback, get_tune_resources


@pytest.mark.parametrize(
    ("call", "bundles"),
    [
        (lambda: get_tune_resources(), [{"CPU": 1}, {"CPU": 1}]),
        (lambda: get_tune_resources(num_workers=4), [{"CPU": 1}] + [{"CPU": 1}] * 4),
        (lambda: get_tune_resources(2, 2, True), [{"CPU": 1}] + [{"CPU": 2, "GPU": 1}] * 2),
        (lambda: get_tune_resources(num_workers=2, num_cpus_per_worker=3), [{"CPU": 1}] + [{"CPU": 3}] * 2),
        (lambda: get_tune_resources(3, use_gpu=True), [{"CPU": 1}] + [{"CPU": 1, "GPU": 1}] * 3),
        (lambda: get_tune_resources(num_workers=2, cpus_per_worker=2), [{"CPU": 1}] + [{"CPU": 2}] * 2),
        # Not in ray_lightning: the trial's own process may reserve nothing, as in raylane's own form.
        (lambda: get_tune_resources(num_workers=2, driver_resources={}), [{"CPU": 1}] * 2),
    ],
)
def test_ray_lightning_form_reserves_what_ray_lightning_did(call: Any, bundles: list[dict[str, float]]) -> None:
    resources = call()
    assert resources.bundles == bundles
    assert resources.strategy == "PACK"


def test_raylane_forms_are_unchanged_next_to_it() -> None:
    assert get_tune_resources("ddp", workers=2).bundles == [{"CPU": 1}] * 2
    assert get_tune_resources(RayStrategy(num_workers=2)).bundles == [{"CPU": 1}] * 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: get_tune_resources(workers=2), "name a backend first"),
        (lambda: get_tune_resources("ddp", 2), "options go by name"),
        (lambda: get_tune_resources(2, num_cpus_per_worker=2, cpus_per_worker=3), "give one"),
        (lambda: get_tune_resources(0), "workers must be at least 1"),
    ],
)
def test_mixed_or_invalid_forms_fail_saying_which_form_to_use(call: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        call()


def test_report_callbacks_take_ray_lightning_positional_arguments() -> None:
    report = TuneReportCallback(["val_loss"], "train_epoch_end")
    assert report.metrics == {"val_loss": "val_loss"} and report.on == ("train_epoch_end",)
    checkpoint = TuneReportCheckpointCallback({"loss": "val_loss"}, "trainer.ckpt", "validation_end")
    assert checkpoint.metrics == {"loss": "val_loss"}
    assert checkpoint.filename == "trainer.ckpt" and checkpoint.on == ("validation_end",)


def ray_lightning_trial(config: dict[str, Any]) -> None:
    """The trial of ray_lightning's README, unchanged except for the imports."""
    model = ClassifierModel(lr=config["lr"])
    callbacks = [TuneReportCheckpointCallback({"loss": "val_loss"}, filename="trainer.ckpt", on="validation_end")]
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=callbacks,
        strategy=RayStrategy(num_workers=2, use_gpu=False),
        default_root_dir=config["root"],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer.fit(model, make_loader(8, samples=32), make_loader(8, samples=32))


@pytest.fixture
def trial_shipped_by_value() -> Iterator[None]:
    # Trial processes need not find this tests folder: Ray sends this module's functions by value.
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


@pytest.mark.timeout(300)
def test_ray_lightning_readme_tune_run_example(local_ray: None, trial_shipped_by_value: None, tmp_path: Path) -> None:
    analysis = tune.run(
        ray_lightning_trial,
        metric="loss",
        mode="min",
        config={"lr": 0.1, "root": str(tmp_path / "root")},
        num_samples=1,
        resources_per_trial=get_tune_resources(num_workers=2),
        storage_path=str(tmp_path / "storage"),
        name="tune_ray_lightning",
        verbose=0,
    )

    trial = analysis.trials[0]
    assert trial.status == "TERMINATED", trial.error_file
    assert trial.last_result["training_iteration"] == 2, "one report per validation, the sanity check left out"
    assert trial.placement_group_factory.bundles == [{"CPU": 1}, {"CPU": 1}, {"CPU": 1}]
    best = analysis.best_checkpoint
    assert best is not None
    with best.as_directory() as directory:
        assert (Path(directory) / "trainer.ckpt").is_file()
    assert_released()
