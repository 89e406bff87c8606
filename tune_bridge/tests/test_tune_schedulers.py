"""Schedulers act on raylane trials: ASHA stops a bad trial after its first report, a failing trial is an error
that leaves the other trials alone, and neither leaves a worker behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from trial_functions import WORKERS, read_record, trial_function

from raylane import WorkerError
from raylane.testing import assert_released
from raylane_tune import get_tune_resources

pytestmark = pytest.mark.timeout(400)

MAX_EPOCHS = 3
GOOD, BAD, FAILING = "good", "bad", "failing"
CASES = {
    GOOD: {"lr": 0.5},
    BAD: {"lr": 1e-4},  # barely moves from the shared initial weights
    FAILING: {"lr": 0.5, "fail_at_epoch": 0},  # rank 1 raises at its first step
}


@pytest.fixture(scope="module")
def asha(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[tune.ResultGrid, Path]:
    record_dir = tmp_path_factory.mktemp("records")
    tuner = tune.Tuner(
        tune.with_resources(trial_function(), get_tune_resources("ddp", workers=WORKERS)),
        param_space={
            "case": tune.grid_search(list(CASES)),
            "lr": tune.sample_from(lambda spec: CASES[spec.config.case]["lr"]),
            "fail_at_epoch": tune.sample_from(lambda spec: CASES[spec.config.case].get("fail_at_epoch")),
            "epochs": MAX_EPOCHS,
            "checkpoint": False,
            "report_all": True,  # metrics=None: every logged metric, under its logged name
            "record_dir": str(record_dir),
        },
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            scheduler=ASHAScheduler(max_t=MAX_EPOCHS, grace_period=1, reduction_factor=2),
            # One at a time, in order: the bad trial reaches ASHA's first rung after the good one did, every time.
            max_concurrent_trials=1,
            reuse_actors=True,  # the next trial's workers go into bundles the last trial's warm workers held
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path_factory.mktemp("storage")), name="asha", verbose=0),
    )
    return tuner.fit(), record_dir


def _result(results: tune.ResultGrid, case: str) -> tune.Result:
    [result] = [result for result in results if result.config["case"] == case]
    return result


def test_asha_stops_the_bad_trial_at_its_first_rung(asha: tuple[tune.ResultGrid, Path]) -> None:
    results, record_dir = asha
    good, bad = _result(results, GOOD), _result(results, BAD)
    assert good.error is None and bad.error is None
    assert good.metrics["training_iteration"] == MAX_EPOCHS
    assert bad.metrics["training_iteration"] == 1, "ASHA stops it at the first rung, two epochs early"
    assert bad.metrics["val_loss"] > good.metrics_dataframe["val_loss"].iloc[0]
    assert {"val_loss", "train_loss", "rank_marker"} <= set(good.metrics)
    # Tune stops a trial by ending its thread inside ray.tune.report, which runs in trainer.fit's relay loop.
    [stopped] = [entry for entry in read_record(record_dir, bad.metrics["trial_id"]) if entry["event"] == "interrupted"]
    assert stopped["error"].startswith("SystemExit")


def test_a_failing_trial_is_an_error_and_the_others_finish(asha: tuple[tune.ResultGrid, Path]) -> None:
    results, record_dir = asha
    failing = _result(results, FAILING)
    assert results.num_errors == 1
    assert isinstance(failing.error, WorkerError), repr(failing.error)  # the worker's failure, as raylane raised it
    assert failing.error.rank == 1 and "injected failure on rank 1" in str(failing.error)
    [failure] = [entry for entry in read_record(record_dir, failing.metrics["trial_id"]) if entry["event"] == "failed"]
    assert failure["error"].startswith("WorkerError")


def test_stopped_and_failed_trials_leave_no_worker_behind(asha: tuple[tune.ResultGrid, Path]) -> None:
    results, record_dir = asha
    assert_released()
    worker_pids = [
        entry["pid"]
        for result in results
        for entry in read_record(record_dir, result.metrics["trial_id"])
        if entry["event"] == "train_start"
    ]
    assert len(worker_pids) == len(CASES)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in worker_pids if _alive(pid)], "a trial's rank 0 process outlived its trial"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
