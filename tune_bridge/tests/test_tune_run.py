"""The classic ``tune.run`` entry point, sized from a strategy object, with a trial that fails once and resumes from
the checkpoint it reported (the pattern that PBT's exploit and Tune's ``max_failures`` both rely on)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray import tune
from trial_functions import WORKERS, read_record, trial_function

from raylane import get_strategy
from raylane.testing import assert_released
from raylane_tune import get_tune_resources

pytestmark = pytest.mark.timeout(300)

EPOCHS = 2


def test_tune_run_resumes_a_failed_trial_from_its_tune_checkpoint(local_ray: None, tmp_path: Path) -> None:
    analysis = tune.run(
        trial_function(),
        resources_per_trial=get_tune_resources(get_strategy("ddp", workers=WORKERS)),
        # The first attempt fails at the first step of epoch 1, after reporting epoch 0 with a checkpoint.
        config={"epochs": EPOCHS, "fail_at_epoch": 1, "record_dir": str(tmp_path)},
        max_failures=1,
        metric="loss",
        mode="min",
        storage_path=str(tmp_path / "storage"),
        name="resume",
        verbose=0,
    )
    [trial] = analysis.trials
    record = read_record(tmp_path, trial.trial_id)
    print(trial.status, trial.last_result, record, trial.error_file)
    assert trial.status == "TERMINATED", trial.error_file
    assert trial.last_result["training_iteration"] == EPOCHS
    events = [
        (entry["event"], entry.get("epoch", entry.get("global_step"))) for entry in record if entry["event"] != "failed"
    ]
    assert events == [
        ("train_start", 0),
        ("train_epoch", 0),
        ("validation", 0),
        ("train_epoch", 1),  # fails here
        ("train_start", 2),  # the restart begins at epoch 0's last step, from the Tune checkpoint
        ("train_epoch", 1),
        ("validation", 1),
    ]
    # The worker raised a RuntimeError: the driver's error is both a WorkerError and a RuntimeError, as Ray's are.
    assert [entry["error"].split(":")[0] for entry in record if entry["event"] == "failed"] == [
        "WorkerError(RuntimeError)"
    ]
    assert analysis.best_checkpoint is not None
    assert_released()
