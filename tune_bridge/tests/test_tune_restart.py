"""A trial whose raylane fit loses a worker and restarts itself (``max_failures``) from an older checkpoint: Tune
sees every epoch exactly once, although the restarted fit trains one epoch again."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray import tune
from trial_functions import read_record, trial_function

from raylane.testing import assert_released
from raylane_tune import get_tune_resources

pytestmark = pytest.mark.timeout(300)

EPOCHS = 4


def test_a_raylane_restart_inside_a_trial_reports_no_iteration_twice(local_ray: None, tmp_path: Path) -> None:
    tuner = tune.Tuner(
        tune.with_resources(trial_function(), get_tune_resources("ddp", workers=2)),
        param_space={
            "epochs": EPOCHS,
            "record_dir": str(tmp_path),
            "checkpoint": False,
            # Checkpoints after epochs 1 and 3 only; rank 1 fails at the start of epoch 3, so the restart resumes
            # after epoch 1 and trains epoch 2 again.
            "checkpoint_every_n_epochs": 2,
            "fail_at_epoch": 3,
            "raylane_max_failures": 1,
        },
        tune_config=tune.TuneConfig(metric="loss", mode="min"),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "storage"), name="restart", verbose=0),
    )
    [result] = tuner.fit()
    assert result.error is None, result.error
    record = read_record(tmp_path, _trial_id(result))
    validated = [entry["epoch"] for entry in record if entry["event"] == "validation"]
    assert validated == [0, 1, 2, 2, 3], "the restart trained epoch 2 again"
    assert (tmp_path / f"{_trial_id(result)}.failed").exists(), "the failure was injected"
    history = result.metrics_dataframe
    assert list(history["training_iteration"]) == [1, 2, 3, 4]
    assert list(history["rank_marker"]) == [0.0, 1.0, 2.0, 3.0], "one report per epoch, each from rank 0"
    assert_released()


def _trial_id(result: tune.Result) -> str:
    return str(result.metrics["trial_id"])
