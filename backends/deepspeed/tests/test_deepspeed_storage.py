"""DeepSpeed checkpoints on a real S3-compatible store (SeaweedFS on loopback, ``raylane.testing.s3``).

DeepSpeed's engine writes a checkpoint as a directory of per-rank files through local paths; the backend stages them
on each node and uploads them (``raylane.staged_checkpoints``). The credentials reach the workers through ``env=``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from raylane import get_strategy
from raylane.staged_checkpoints import STAGING_PREFIX
from raylane.testing import (
    ClassifierModel,
    KilledOnce,
    assert_released,
    ensure_local_ray,
    make_loader,
    weight_fingerprint,
)
from raylane.testing.s3 import S3Server, s3_server  # noqa: F401  (the fixture)
from raylane_deepspeed.checkpoints import consolidated_state_dict

pytestmark = pytest.mark.timeout(300)

WORKERS = 2
SAMPLES = 32


@pytest.fixture(autouse=True)
def _ray() -> None:
    ensure_local_ray()


def _trainer(root: Path, env: dict[str, str], stage: int, max_epochs: int, **flags: object) -> pl.Trainer:
    return pl.Trainer(
        strategy=get_strategy("deepspeed", workers=WORKERS, stage=stage, env=env),
        max_epochs=max_epochs,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **flags,
    )


def _loaders() -> tuple:
    return make_loader(8, samples=SAMPLES), make_loader(8, samples=SAMPLES)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoints_land_in_the_bucket_and_ckpt_path_resumes_from_it(
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
    stage: int,
) -> None:
    bucket = s3_server.create_bucket()
    run = f"s3://{bucket}/run"
    checkpoint = ModelCheckpoint(dirpath=f"{run}/ckpt", monitor="val_loss", save_top_k=1, save_last=True)
    model = ClassifierModel(optimizer="adam")
    trainer = _trainer(tmp_path, s3_server.env(), stage, max_epochs=2, callbacks=[checkpoint])
    trainer.fit(model, *_loaders())

    last, best = trainer.checkpoint_callback.last_model_path, trainer.checkpoint_callback.best_model_path
    assert last == f"{run}/ckpt/last.ckpt" and best.startswith(f"{run}/ckpt/epoch="), (last, best)
    kept = s3_server.names_under(f"{run}/ckpt")
    assert kept == {Path(best).name, "last.ckpt"}, f"the earlier best checkpoint's objects were removed: {kept}"
    downloaded = s3_server.download(last, tmp_path / "downloaded" / "last.ckpt")
    files = {path.name for path in downloaded.rglob("*")}
    assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(WORKERS)} <= files, files
    torch.testing.assert_close(consolidated_state_dict(downloaded)["layer.weight"], model.layer.weight)
    assert not list(Path.cwd().glob("s3:*")) and not list(tmp_path.rglob("s3:*")), "nothing was written locally"
    assert not list(Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*")), "a staging folder was left"

    # A new Trainer and a new model, resumed from the URL on the workers at the epoch the run ended: nothing trains,
    # and the weights the driver gets back (gathered from the ranks' partitions at stage 3) are the bucket's.
    torch.manual_seed(1)
    resumed = ClassifierModel(optimizer="adam")
    trainer = _trainer(tmp_path, s3_server.env(), stage, max_epochs=2, enable_checkpointing=False)
    trainer.fit(resumed, *_loaders(), ckpt_path=last)
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * SAMPLES // 8 // WORKERS
    torch.testing.assert_close(resumed.layer.weight, model.layer.weight)
    trainer.strategy.release_workers()
    assert_released()


def test_a_killed_rank_restarts_the_fit_from_the_buckets_last_checkpoint(
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``max_failures`` with checkpoints in a bucket: the new workers resume from the bucket's latest checkpoint (a
    directory of every rank's shards, which they fetch), not from the start."""
    directory = f"s3://{s3_server.create_bucket()}/ckpt"
    steps_per_epoch = SAMPLES // 8 // WORKERS
    # The first step of the third epoch, after the second epoch's checkpoint.
    killed = KilledOnce(rank=1, at_step=2 * steps_per_epoch, folder=tmp_path)
    model = ClassifierModel(**killed.model_options(), report_dir=str(tmp_path))
    every_epoch = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        strategy=get_strategy("deepspeed", workers=WORKERS, env=s3_server.env(), max_failures=1),
        max_epochs=3,
        callbacks=[every_epoch],
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, *_loaders())

    assert killed.happened, "the failure was injected"
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * steps_per_epoch
    resumed_from = f"{directory}/epoch=1-step={2 * steps_per_epoch}.ckpt"
    shards = s3_server.download(resumed_from, tmp_path / "downloaded" / "resumed_from")
    weights = consolidated_state_dict(shards)["layer.weight"]
    started_from = json.loads((tmp_path / "fit-rank0.json").read_text())["initial_weight_fingerprint"]
    assert started_from == pytest.approx(weight_fingerprint(weights)), "rank 0 began at that checkpoint"
    trainer.strategy.release_workers()
    assert_released()
