"""Checkpoints at a URL (``s3://...``) for Lightning strategies that save and load through local paths only.

Lightning's ModelParallelStrategy (torch's distributed checkpoint: every rank its own ``.distcp`` file, rank 0 the
metadata) and DeepSpeedStrategy (a directory of per-rank files the engine writes) turn ``s3://bucket/run/last.ckpt``
into a local folder named ``s3:``. :class:`StagedURLCheckpoints` makes them save into, and load from, a staging folder
at the same path on every node instead; one rank per node uploads what that node's ranks wrote, or downloads the whole
checkpoint (a run resumed on another number of workers may need any rank's files).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from raylane import storage

STAGING_PREFIX = "raylane-checkpoint-"


class StagedURLCheckpoints:
    """Put it before :class:`raylane.strategy.RayStrategyMixin` in a backend strategy's bases: a checkpoint URL then
    passes through node-local staging; a local path goes to the Lightning strategy's own save and load unchanged."""

    # Provided by the Lightning strategy the class is built on.
    barrier: Any
    broadcast: Any
    is_global_zero: bool
    local_rank: int

    def write_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not storage.is_remote(filepath):
            super().write_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
            return
        token = self._staging_token()
        local = local_copy(str(filepath), token)
        try:
            super().write_checkpoint(checkpoint, local, storage_options)  # type: ignore[misc]
            self.barrier("raylane_checkpoint_saved")  # every rank wrote; rank 0's files name all the others'
            if self.is_global_zero:
                clear(str(filepath))
            self.barrier("raylane_checkpoint_cleared")
            if self.local_rank == 0:
                upload(local, str(filepath))
            self.barrier("raylane_checkpoint_uploaded")  # whole before anyone names it (ModelCheckpoint, a restart)
        finally:
            if self.local_rank == 0:
                remove_staging(token)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not storage.is_remote(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc,no-any-return]
        token = self._staging_token()
        local = local_copy(str(checkpoint_path), token)
        try:
            if self.local_rank == 0:  # once per node; a resume on another world size may need any rank's files
                download(str(checkpoint_path), local)
            self.barrier("raylane_checkpoint_downloaded")
            loaded = super().load_checkpoint(local, *args, **kwargs)  # type: ignore[misc]
            self.barrier("raylane_checkpoint_loaded")
            return loaded  # type: ignore[no-any-return]
        finally:
            if self.local_rank == 0:
                remove_staging(token)

    def remove_checkpoint(self, filepath: Any) -> None:
        # A replaced best checkpoint: at a URL, a folder of per-rank files is a set of objects (see clear).
        if not storage.is_remote(filepath):
            super().remove_checkpoint(filepath)  # type: ignore[misc]
        elif self.is_global_zero:
            clear(str(filepath))

    def _staging_token(self) -> str:
        """The same on every rank, so every node stages at the path Lightning broadcasts from rank 0."""
        return str(self.broadcast(uuid.uuid4().hex))


def staging_folder(token: str) -> Path:
    """The node-local folder a checkpoint passes through: the same path on every node for the same ``token``."""
    return Path(tempfile.gettempdir()) / f"{STAGING_PREFIX}{token}"


def remove_staging(token: str) -> None:
    shutil.rmtree(staging_folder(token), ignore_errors=True)


def local_copy(url: str, token: str) -> Path:
    """Where the checkpoint for ``url`` lies in the staging folder of ``token`` (its name is the URL's last part)."""
    return staging_folder(token) / Path(storage.open_filesystem(url)[1]).name


def clear(url: str) -> None:
    """Remove the checkpoint at ``url``: one object, or every object of a folder of per-rank files. Also what an
    earlier save left there (a ``last.ckpt`` saved again, maybe by another number of ranks, whose extra files would
    stay).

    Listed afresh (a new filesystem instance, not a listing cached before the upload) and removed object by object:
    an object store has no folders to remove."""
    filesystem, remote = storage.open_filesystem(url)
    keys = filesystem.find(remote)
    if keys:
        filesystem.rm(keys)


def upload(local: Path, url: str) -> None:
    """Every file this node wrote under ``local`` (a checkpoint folder, or one file), to the same place under ``url``.
    Nothing, on a node whose ranks wrote nothing (a consolidated checkpoint is rank 0's alone)."""
    filesystem, remote = storage.open_filesystem(url)
    if local.is_file():
        filesystem.put_file(str(local), remote)
        return
    for file in sorted(path for path in local.rglob("*") if path.is_file()) if local.is_dir() else []:
        filesystem.put_file(str(file), f"{remote}/{file.relative_to(local).as_posix()}")


def download(url: str, local: Path) -> None:
    """The checkpoint at ``url`` (a folder of per-rank files, or one file), to ``local``."""
    filesystem, remote = storage.open_filesystem(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    if filesystem.isfile(remote):
        filesystem.get_file(remote, str(local))
        return
    files = filesystem.find(remote)
    if not files:
        raise FileNotFoundError(f"{url}: no checkpoint there (no object, and no folder of files)")
    for file in files:
        target = local / Path(file).relative_to(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        filesystem.get_file(file, str(target))
