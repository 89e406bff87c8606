"""Which of rank 0's files go to a driver that cannot read them: checkpoint files and checkpoint directories."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from raylane.results import _files_for_driver


def test_a_checkpoint_directory_comes_back_file_by_file_and_other_checkpoints_stay(tmp_path: Path) -> None:
    """A sharded checkpoint (torch distributed checkpoint) is a directory: each of its files is sent. Checkpoints in
    the log directory that the callback no longer tracks (deleted by save_top_k elsewhere) are not."""
    logger = CSVLogger(save_dir=str(tmp_path), version=0)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = pl.Trainer(accelerator="cpu", logger=logger, callbacks=[checkpoint], enable_progress_bar=False)
    best = tmp_path / "ckpt" / "epoch=1.ckpt"
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"):
        (best / name).parent.mkdir(parents=True, exist_ok=True)
        (best / name).write_bytes(name.encode())
    checkpoint.best_model_path = str(best)
    untracked = Path(logger.log_dir) / "checkpoints" / "epoch=0.ckpt"
    untracked.mkdir(parents=True)
    (untracked / "__0_0.distcp").write_bytes(b"old")
    (Path(logger.log_dir) / "metrics.csv").write_text("epoch\n1\n")

    files = _files_for_driver(trainer)

    assert {Path(path).relative_to(best).as_posix(): data for path, data in files.items() if str(best) in path} == {
        name: name.encode() for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt")
    }
    assert str(Path(logger.log_dir) / "metrics.csv") in files
    assert not any(str(untracked) in path for path in files), "an untracked checkpoint directory stays on the worker"
