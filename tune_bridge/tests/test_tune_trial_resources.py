"""A trial that did not reserve its workers fails at once and says what to pass; a Trainer without raylane inside a
trial reports straight to Tune. Three light trials run together in one Tuner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ray import tune
from trial_functions import WORKERS, read_record, trial_function

from raylane import ResourceError, get_strategy
from raylane.testing import assert_released
from raylane_tune import get_tune_resources

pytestmark = pytest.mark.timeout(300)

FORGOT, TOO_SMALL, PLAIN = "forgot get_tune_resources", "bundles too small", "no raylane"
EPOCHS = 2


@pytest.fixture(scope="module")
def results(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[tune.ResultGrid, Path]:
    too_small = get_tune_resources("ddp", workers=WORKERS)  # one CPU per worker, but the trial asks for two
    default = tune.PlacementGroupFactory([{"CPU": 1}])  # what a function trainable gets when nobody says otherwise

    def _resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:  # local: Ray pickles it by value
        return too_small if config["case"] == TOO_SMALL else default

    record_dir = tmp_path_factory.mktemp("records")
    tuner = tune.Tuner(
        tune.with_resources(trial_function(), _resources),
        param_space={
            "case": tune.grid_search([FORGOT, TOO_SMALL, PLAIN]),
            "plain": tune.sample_from(lambda spec: spec.config.case == PLAIN),
            "cpus_per_worker": tune.sample_from(lambda spec: 2 if spec.config.case == TOO_SMALL else 1),
            "epochs": EPOCHS,
            "extra_metrics": {"absent": "never_logged"},
            "record_dir": str(record_dir),
        },
        run_config=tune.RunConfig(storage_path=str(tmp_path_factory.mktemp("storage")), name="resources", verbose=0),
    )
    return tuner.fit(), record_dir


def _case(results: tune.ResultGrid, case: str) -> tune.Result:
    [result] = [result for result in results if result.config["case"] == case]
    return result


@pytest.mark.parametrize("case", [FORGOT, TOO_SMALL])
def test_workers_that_do_not_fit_the_trial_fail_at_once_saying_what_to_pass(
    results: tuple[tune.ResultGrid, Path], case: str
) -> None:
    grid, record_dir = results
    result = _case(grid, case)
    assert isinstance(result.error, ResourceError), repr(result.error)
    message = str(result.error)
    assert "get_tune_resources(strategy)" in message and "tune.with_resources" in message
    assert "resources_per_trial" in message
    expected = "get_tune_resources(<backend>, workers=2" + (", cpus_per_worker=2)" if case == TOO_SMALL else ")")
    assert expected in message
    [failure] = [entry for entry in read_record(record_dir, result.metrics["trial_id"]) if entry["event"] == "failed"]
    assert failure["after_s"] < 30, "it must fail before starting any worker, not wait for resources (300 s)"
    assert_released()


def test_a_trainer_without_raylane_reports_from_the_trial_itself(results: tuple[tune.ResultGrid, Path]) -> None:
    grid, record_dir = results
    result = _case(grid, PLAIN)
    assert result.error is None
    assert result.metrics["training_iteration"] == EPOCHS
    logged = [entry for entry in read_record(record_dir, result.metrics["trial_id"]) if entry["event"] == "validation"]
    assert result.metrics_dataframe["loss"].tolist() == pytest.approx([entry["val_loss"] for entry in logged])
    assert "absent" not in result.metrics, "a metric that was never logged is left out, not invented"
    assert result.checkpoint is not None


def test_an_elastic_strategy_runs_on_the_workers_its_trial_reserved(local_ray: None, tmp_path: Path) -> None:
    """``workers=(1, 2)``: a trial sized by default holds the most workers and trains on 2; one that reserved one
    (``reserve_workers=1``) trains on 1 and never grows past its trial's bundles, whatever the cluster has free."""
    elastic = get_strategy("ddp", workers=(1, 2))
    most, fewest = get_tune_resources(elastic), get_tune_resources(elastic, reserve_workers=1)

    def _resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:  # local: Ray pickles it by value
        return most if config["reserved"] == 2 else fewest

    tuner = tune.Tuner(
        tune.with_resources(trial_function(), _resources),
        param_space={
            "reserved": tune.grid_search([2, 1]),
            "workers_range": (1, 2),
            "epochs": 1,
            "record_dir": str(tmp_path),
        },
        run_config=tune.RunConfig(storage_path=str(tmp_path / "storage"), name="elastic", verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    sizes = {
        result.config["reserved"]: [
            entry["world_size"]
            for entry in read_record(tmp_path, str(result.metrics["trial_id"]))
            if entry["event"] == "train_start"
        ]
        for result in grid
    }
    assert sizes == {2: [2], 1: [1]}
    assert_released()
