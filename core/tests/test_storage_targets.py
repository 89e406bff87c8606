"""Remote checkpoint and log URLs without Ray: which ones the driver finds, what rank 0's checks say about URLs it
cannot use, and that rank 0's copy back to the driver leaves URLs alone. The same against a real S3 server, on real
workers, is in tests/test_storage.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from raylane import ConfigurationError, LaunchOptions, StorageError
from raylane.results import _files_for_driver
from raylane.storage import StorageTargets, check_targets, find_targets, is_remote, redact


def _trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize(
    ("path", "remote"),
    [
        ("s3://bucket/ckpt", True),
        ("gs://bucket", True),
        ("memory://x", True),
        ("/tmp/ckpt", False),
        ("runs/ckpt", False),
        ("last", False),
        ("file:///tmp/x", False),
    ],
)
def test_urls_are_remote_and_paths_and_keywords_are_not(path: str, remote: bool) -> None:
    assert is_remote(path) is remote


def test_the_driver_finds_every_remote_url_of_the_trainer_and_the_entry_point(tmp_path: Path) -> None:
    trainer = _trainer(
        default_root_dir="s3://bucket/root",
        callbacks=[ModelCheckpoint(dirpath="memory://bucket/ckpt"), ModelCheckpoint(str(tmp_path), monitor="loss")],
        logger=[CSVLogger(save_dir="memory://bucket/logs"), CSVLogger(save_dir=str(tmp_path))],
    )
    assert find_targets(trainer, "s3://bucket/last.ckpt") == StorageTargets(
        write=("s3://bucket/root", "memory://bucket/ckpt", "memory://bucket/logs"), read=("s3://bucket/last.ckpt",)
    )
    local = _trainer(default_root_dir=str(tmp_path), callbacks=[ModelCheckpoint(dirpath=str(tmp_path))])
    assert not find_targets(local, "last"), "local paths and ckpt_path keywords need no check"


def test_a_url_whose_filesystem_package_is_missing_names_the_pip_install() -> None:
    # ocifs (Oracle Cloud's fsspec package) is installed in no test environment of this project.
    with pytest.raises(StorageError, match=r"`pip install ocifs`.*runtime_env=\{'pip': \['ocifs'\]\}"):
        check_targets(StorageTargets(write=("oci://bucket@namespace/ckpt",)))
    with pytest.raises(StorageError, match="knows no filesystem for 'nosuch://'"):
        check_targets(StorageTargets(read=("nosuch://bucket/last.ckpt",)))


def test_a_usable_url_passes_and_leaves_no_probe_behind() -> None:
    import fsspec

    check_targets(StorageTargets(write=("memory://raylane-probe/ckpt",)))
    assert fsspec.filesystem("memory").find("/raylane-probe") == []


def test_credential_values_are_redacted_from_messages() -> None:
    environ = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "MY_API_TOKEN": "tok-123", "MASTER_ADDR": "10.0.0.1"}
    text = "denied for s3cr3t-value with tok-123 at 10.0.0.1"
    assert redact(text, environ) == "denied for *** with *** at 10.0.0.1"


def test_options_never_show_what_env_holds() -> None:
    with pytest.raises(ConfigurationError, match="AWS_SECRET_ACCESS_KEY") as failure:
        LaunchOptions(workers=1, env={"AWS_SECRET_ACCESS_KEY": 1234567890})  # type: ignore[dict-item]
    assert "1234567890" not in str(failure.value)
    assert "s3cr3t-value" not in repr(LaunchOptions(workers=1, env={"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}))


def test_files_for_the_driver_never_read_urls_as_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL read as a path ("memory://b/x" -> the folder "memory:", then "b/x") would copy whatever lies there."""
    monkeypatch.chdir(tmp_path)
    checkpoint = ModelCheckpoint(dirpath="memory://bucket/ckpt")
    logger = CSVLogger(save_dir="memory://bucket/logs", version=0)
    trainer = _trainer(callbacks=[checkpoint], logger=logger)
    checkpoint.last_model_path = "memory://bucket/ckpt/last.ckpt"
    checkpoint.best_model_path = str(tmp_path / "best.ckpt")  # a local checkpoint next to it is still sent
    for lookalike in ("memory:/bucket/ckpt/last.ckpt", "memory:/bucket/logs/lightning_logs/version_0/metrics.csv"):
        Path(lookalike).parent.mkdir(parents=True, exist_ok=True)
        Path(lookalike).write_bytes(b"not the run's file")
    Path(checkpoint.best_model_path).write_bytes(b"best")
    assert os.path.isfile(checkpoint.last_model_path) and os.path.isdir(logger.log_dir), "the lookalikes are there"
    assert _files_for_driver(trainer) == {checkpoint.best_model_path: b"best"}
