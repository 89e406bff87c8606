"""Four trials of 2 DDP workers each on a 4-CPU Ray: two trials' worth of workers, so Tune must queue the rest.

One Tuner run; each test checks one promise about it.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import ray
import torch
from ray import tune
from trial_functions import REPORTED, WORKERS, RecordingModel, read_record, read_times, trial_function

from raylane.testing import assert_released
from raylane_tune import get_tune_resources

pytestmark = pytest.mark.timeout(400)

EPOCHS = (1, 2)
LRS = (0.02, 0.2)


@pytest.fixture(scope="module")
def grid(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[tune.ResultGrid, Path]:
    record_dir = tmp_path_factory.mktemp("records")
    tuner = tune.Tuner(
        tune.with_resources(trial_function(), get_tune_resources("ddp", workers=WORKERS)),
        param_space={
            "epochs": tune.grid_search(list(EPOCHS)),
            "lr": tune.grid_search(list(LRS)),
            "record_dir": str(record_dir),
        },
        tune_config=tune.TuneConfig(metric="loss", mode="min"),
        run_config=tune.RunConfig(storage_path=str(tmp_path_factory.mktemp("storage")), name="grid", verbose=0),
    )
    return tuner.fit(), record_dir


def test_every_trial_finishes(grid: tuple[tune.ResultGrid, Path]) -> None:
    results, _ = grid
    assert len(results) == len(EPOCHS) * len(LRS)
    assert results.num_errors == 0, [result.error for result in results]
    assert_released()


def test_each_epoch_is_one_training_iteration(grid: tuple[tune.ResultGrid, Path]) -> None:
    results, _ = grid
    for result in results:
        assert result.metrics["training_iteration"] == result.config["epochs"]
        assert len(result.metrics_dataframe) == result.config["epochs"], "the sanity check must not be reported"


def test_reported_metrics_are_what_rank_zero_logged(grid: tuple[tune.ResultGrid, Path]) -> None:
    results, record_dir = grid
    for result in results:
        logged = [
            entry for entry in read_record(record_dir, result.metrics["trial_id"]) if entry["event"] == "validation"
        ]
        reported = result.metrics_dataframe.to_dict("records")
        assert len(logged) == len(reported) == result.config["epochs"]
        for epoch, (ours, theirs) in enumerate(zip(reported, logged)):
            assert ours["loss"] == pytest.approx(theirs[REPORTED["loss"]])
            assert ours["rank_marker"] == epoch, "the marker rank 1 logs is 100 + epoch; Tune must get rank 0's"


def test_best_checkpoint_loads_into_a_lightning_module(grid: tuple[tune.ResultGrid, Path]) -> None:
    results, _ = grid
    best = results.get_best_result()
    assert best.metrics["loss"] == min(result.metrics["loss"] for result in results)
    assert best.checkpoint is not None
    with best.checkpoint.as_directory() as directory:
        assert os.listdir(directory) == ["model.ckpt"]
        path = os.path.join(directory, "model.ckpt")
        model = RecordingModel.load_from_checkpoint(path, weights_only=False)
        saved = torch.load(path, weights_only=False)
    assert saved["epoch"] == best.config["epochs"] - 1
    assert model.hparams.lr == best.config["lr"]
    torch.testing.assert_close(model.layer.weight, saved["state_dict"]["layer.weight"])
    assert not torch.equal(model.layer.weight, RecordingModel(record="").layer.weight)


def test_trials_share_the_cluster_exactly_as_far_as_it_holds(grid: tuple[tune.ResultGrid, Path]) -> None:
    results, record_dir = grid
    spans = [read_times(record_dir, result.metrics["trial_id"]) for result in results]
    capacity = int(ray.cluster_resources()["CPU"]) // WORKERS
    moments = sorted({start for start, _ in spans})
    most_at_once = max(sum(start <= moment < end for start, end in spans) for moment in moments)
    assert most_at_once == capacity, f"{most_at_once} trials trained at once; the cluster holds {capacity}"
    # And not merely serialised in a lucky order: some pair of trials overlapped.
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(spans, 2))
