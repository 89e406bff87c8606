"""Checkpoints and logs on a real S3-compatible store (SeaweedFS on loopback, ``raylane.testing.s3``), with the
credentials and endpoint reaching the workers through ``env=`` only: the driver process itself has none.

The restart on another node after a node's loss is in test_node_loss.py (it needs Ray's multi-node cluster).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from raylane import StorageError, WorkerError, get_strategy
from raylane.staged_checkpoints import STAGING_PREFIX
from raylane.testing import ClassifierModel, KilledOnce, assert_released, make_loader, weight_fingerprint
from raylane.testing.s3 import S3Server

pytestmark = pytest.mark.timeout(240)

WORKERS = 2
SAMPLES = 32
STEPS_PER_EPOCH = SAMPLES // 8 // WORKERS


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


def _trainer(
    tmp_path: Path,
    env: dict[str, str],
    max_epochs: int = 2,
    workers: int = WORKERS,
    backend: str = "ddp",
    **options: object,
) -> pl.Trainer:
    callbacks = options.pop("callbacks", [])
    logger = options.pop("logger", False)
    return pl.Trainer(
        strategy=get_strategy(backend, workers=workers, env=env, **options),
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _loaders() -> tuple:
    return make_loader(8, samples=SAMPLES), make_loader(8, samples=SAMPLES)


def _weights_in(s3_server: S3Server, url: str) -> dict[str, torch.Tensor]:
    with s3_server.filesystem().open(url, "rb") as checkpoint:
        return torch.load(checkpoint, weights_only=False)["state_dict"]


def _checkpoint_weights(s3_server: S3Server, url: str, scratch: Path) -> dict[str, torch.Tensor]:
    """The weights of the checkpoint at ``url``: one file, or the fsdp backend's folder of shards."""
    store = s3_server.filesystem()
    if store.isfile(url):
        return _weights_in(s3_server, url)
    from raylane_fsdp.checkpoint import load_full_checkpoint

    local = s3_server.download(url, scratch / "downloaded" / Path(url).name)
    return load_full_checkpoint(local)["state_dict"]  # type: ignore[no-any-return]


def _started_from(report_dir: Path) -> float:
    """The fingerprint of rank 0's weights when its (last) fit started: after Lightning restored any checkpoint."""
    return json.loads((report_dir / "fit-rank0.json").read_text())["initial_weight_fingerprint"]


def test_checkpoints_and_logs_land_in_the_bucket_and_ckpt_path_resumes_from_it(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = f"s3://{bucket}/run"
    checkpoint = ModelCheckpoint(dirpath=f"{run}/ckpt", monitor="val_loss", save_top_k=1, save_last=True)
    logger = CSVLogger(save_dir=f"{run}/logs", name="csv", version=0)
    model = ClassifierModel()
    trainer = _trainer(tmp_path, s3_server.env(), callbacks=[checkpoint], logger=logger)
    trainer.fit(model, *_loaders())

    # The driver's Trainer names the objects in the bucket, and they hold what was trained.
    last, best = trainer.checkpoint_callback.last_model_path, trainer.checkpoint_callback.best_model_path
    assert last == f"{run}/ckpt/last.ckpt"
    assert best.startswith(f"{run}/ckpt/epoch=") and best.endswith(".ckpt"), best
    assert trainer.logger.log_dir == f"{run}/logs/csv/version_0"
    store = s3_server.filesystem()
    assert store.exists(best)
    torch.testing.assert_close(_weights_in(s3_server, last)["layer.weight"], model.layer.weight)
    assert "val_loss" in store.cat_file(f"{run}/logs/csv/version_0/metrics.csv").decode()
    assert not list(tmp_path.rglob("*.ckpt")) and not list(Path.cwd().glob("s3:*")), "nothing was written locally"
    output = "".join(capfd.readouterr()) + caplog.text  # what rank 0 printed, and the driver's log (start line)
    assert "raylane: ddp backend" in output
    assert s3_server.secret_key not in output

    # A new Trainer and a new model, resumed from the URL: rank 0 starts from the bucket's weights, one epoch on.
    torch.manual_seed(1)
    resumed = ClassifierModel(report_dir=str(tmp_path))
    assert not torch.equal(resumed.layer.weight, model.layer.weight)
    trainer = _trainer(tmp_path, s3_server.env(), max_epochs=3)
    trainer.fit(resumed, *_loaders(), ckpt_path=last)
    assert _started_from(tmp_path) == pytest.approx(weight_fingerprint(model.layer.weight))
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * STEPS_PER_EPOCH
    trainer.strategy.release_workers()
    assert_released()


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_a_killed_rank_restarts_the_fit_from_the_bucket(
    s3_server: S3Server, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    directory = f"s3://{bucket}/ckpt"
    # The first step of the third epoch, after the second epoch's checkpoint.
    killed = KilledOnce(rank=1, at_step=2 * STEPS_PER_EPOCH, folder=tmp_path)
    model = ClassifierModel(**killed.model_options(), report_dir=str(tmp_path))
    every_epoch = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1)
    trainer = _trainer(
        tmp_path, s3_server.env(), max_epochs=3, backend=backend, max_failures=1, callbacks=[every_epoch]
    )
    with caplog.at_level(logging.WARNING, logger="raylane"):
        trainer.fit(model, *_loaders())
    assert killed.happened, "the failure was injected"
    resumed_from = f"{directory}/epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt"
    assert any(f"restarting fit from {resumed_from}" in record.getMessage() for record in caplog.records)
    weights = _checkpoint_weights(s3_server, resumed_from, tmp_path)["layer.weight"]
    assert _started_from(tmp_path) == pytest.approx(weight_fingerprint(weights))
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * STEPS_PER_EPOCH
    trainer.strategy.release_workers()
    assert_released()


def _runtime_env_without_s3fs(directory: Path) -> dict[str, object]:
    """Workers whose Python cannot import s3fs, as on nodes where it is not installed: a package of that name that
    fails to import comes first on their path."""
    shadow = directory / "site" / "s3fs"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 's3fs'\", name='s3fs')\n")
    return {"env_vars": {"PYTHONPATH": str(shadow.parent)}}


@pytest.mark.parametrize(
    "case",
    ["missing bucket", "refused credentials", "missing checkpoint", "package missing on the workers"],
)
def test_a_url_the_workers_cannot_use_fails_before_training(
    s3_server: S3Server, bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], case: str
) -> None:
    env, options, ckpt_path = s3_server.env(), {}, None
    dirpath = f"s3://{bucket}/ckpt"
    wrong_secret = "wrong-" + s3_server.secret_key[::-1]
    if case == "missing bucket":
        dirpath, expected = f"s3://{bucket}-never-created/ckpt", f"bucket '{bucket}-never-created' does not exist"
    elif case == "refused credentials":
        env, expected = s3_server.env(AWS_SECRET_ACCESS_KEY=wrong_secret), "refused the workers' credentials"
    elif case == "missing checkpoint":
        ckpt_path, expected = f"s3://{bucket}/none.ckpt", "no such checkpoint"
    else:
        options, expected = {"runtime_env": _runtime_env_without_s3fs(tmp_path)}, "pip install s3fs"
    trainer = _trainer(tmp_path, env, workers=1, callbacks=[ModelCheckpoint(dirpath=dirpath)], **options)
    with pytest.raises(StorageError) as failure:
        trainer.fit(ClassifierModel(report_dir=str(tmp_path)), *_loaders(), ckpt_path=ckpt_path)
    message = str(failure.value)
    assert expected in message, message
    assert not (tmp_path / "fit-rank0.json").exists(), "no training started"
    for secret in (s3_server.secret_key, wrong_secret):
        assert secret not in message and secret not in "".join(capfd.readouterr())
    assert_released()


def test_a_failing_rank_names_no_credential(s3_server: S3Server, bucket: str, tmp_path: Path, capfd) -> None:
    model = ClassifierModel(fail_on_rank=1, fail_at_step=1, fail_mode="raise")
    checkpoint = ModelCheckpoint(dirpath=f"s3://{bucket}/ckpt")
    with pytest.raises(WorkerError) as failure:
        _trainer(tmp_path, s3_server.env(), callbacks=[checkpoint]).fit(model, *_loaders())
    assert "injected failure on rank 1" in str(failure.value)
    assert s3_server.secret_key not in str(failure.value) and s3_server.secret_key not in "".join(capfd.readouterr())
    assert_released()


def _nothing_written_locally(tmp_path: Path) -> bool:
    return not list(Path.cwd().glob("s3:*")) and not list(tmp_path.rglob("s3:*"))


@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_fsdp_checkpoints_land_in_the_bucket_and_ckpt_path_resumes_from_it(
    s3_server: S3Server, bucket: str, tmp_path: Path, state_dict_type: str
) -> None:
    # torch's distributed checkpoint writes through local paths: every rank stages its shards and uploads them.
    run = f"s3://{bucket}/run"
    checkpoint = ModelCheckpoint(dirpath=f"{run}/ckpt", monitor="val_loss", save_top_k=1, save_last=True)
    model = ClassifierModel(optimizer="adam")
    options = {"backend": "fsdp", "state_dict_type": state_dict_type}
    trainer = _trainer(tmp_path, s3_server.env(), callbacks=[checkpoint], **options)
    trainer.fit(model, *_loaders())

    last, best = trainer.checkpoint_callback.last_model_path, trainer.checkpoint_callback.best_model_path
    assert last == f"{run}/ckpt/last.ckpt" and best.startswith(f"{run}/ckpt/epoch="), (last, best)
    kept = s3_server.names_under(f"{run}/ckpt")
    assert kept == {Path(best).name, "last.ckpt"}, f"the earlier best checkpoint's objects were removed: {kept}"
    store = s3_server.filesystem()
    if state_dict_type == "sharded":
        shards = sorted(Path(key).name for key in store.find(last))
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"], shards
    else:
        assert store.isfile(last)
    saved = _checkpoint_weights(s3_server, last, tmp_path)
    torch.testing.assert_close(saved["layer.weight"], model.layer.weight)
    assert _nothing_written_locally(tmp_path)
    assert not list(Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*")), "a staging folder was left"

    # A new Trainer and a new model, resumed from the URL on the workers: one epoch on from the bucket's weights.
    torch.manual_seed(1)
    resumed = ClassifierModel(optimizer="adam", report_dir=str(tmp_path))
    trainer = _trainer(tmp_path, s3_server.env(), max_epochs=3, **options)
    trainer.fit(resumed, *_loaders(), ckpt_path=last)
    assert _started_from(tmp_path) == pytest.approx(weight_fingerprint(model.layer.weight))
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * STEPS_PER_EPOCH
    trainer.strategy.release_workers()
    assert_released()
