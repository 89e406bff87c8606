"""Tune's storage on a real S3-compatible server (SeaweedFS, ``raylane.testing.s3``): the checkpoints that
``TuneReportCheckpointCallback`` reports from raylane's workers live in the bucket, and a failed trial resumes from
there."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from pyarrow import fs as arrow_fs
from ray import tune
from trial_functions import STEPS_PER_EPOCH, read_record, trial_function

from raylane.testing import assert_released
from raylane.testing.s3 import S3Server
from raylane_tune import get_tune_resources

pytestmark = pytest.mark.timeout(300)

EPOCHS = 2


def test_reported_checkpoints_live_in_the_bucket_and_a_failed_trial_resumes_from_it(
    local_ray: None, s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.create_bucket()
    endpoint = urlparse(s3_server.endpoint)
    storage = arrow_fs.S3FileSystem(
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme,
        region=s3_server.region,
    )
    tuner = tune.Tuner(
        tune.with_resources(trial_function(), get_tune_resources("ddp", workers=2)),
        # The first attempt fails at the first step of epoch 1, after reporting epoch 0 with a checkpoint. Rank 0
        # fails: its report of epoch 0 is sent before, in the same thread (a peer's failure can overtake it).
        param_space={"epochs": EPOCHS, "fail_at_epoch": 1, "fail_on_rank": 0, "record_dir": str(tmp_path)},
        tune_config=tune.TuneConfig(metric="loss", mode="min"),
        run_config=tune.RunConfig(
            storage_path=f"{bucket}/tune",
            storage_filesystem=storage,
            name="s3",
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=0,
        ),
    )
    [result] = tuner.fit()
    assert result.error is None, result.error
    assert result.metrics["training_iteration"] == EPOCHS
    checkpoint = result.checkpoint
    assert checkpoint is not None and checkpoint.path.startswith(f"{bucket}/tune/s3/"), checkpoint
    assert isinstance(checkpoint.filesystem, arrow_fs.S3FileSystem)
    # The objects are in the bucket, as another client (s3fs) sees them, and they are the last epoch's checkpoint.
    with s3_server.filesystem().open(f"{checkpoint.path}/model.ckpt", "rb") as saved:
        assert torch.load(saved, weights_only=False)["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # The restarted attempt began where epoch 0's checkpoint, read back from the bucket, left off.
    starts = [
        e["global_step"] for e in read_record(tmp_path, str(result.metrics["trial_id"])) if e["event"] == "train_start"
    ]
    assert starts == [0, STEPS_PER_EPOCH]
    assert_released()
