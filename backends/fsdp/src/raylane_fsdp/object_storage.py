"""Moving checkpoints between a URL (``s3://...``) and a node's local staging folder.

Lightning's ModelParallelStrategy saves with torch's distributed checkpoint (every rank its own ``.distcp`` file, rank
0 the metadata) or ``torch.save``, and loads, through a local ``Path``, broadcasting rank 0's path to every rank:
given ``s3://bucket/run/last.ckpt`` it would write a local folder named ``s3:``. The strategy
(:class:`raylane_fsdp.strategy.RayFSDPStrategy`) instead saves into, and loads from, a staging folder at the same path
on every node; one rank per node uploads what that node's ranks wrote, or downloads the whole checkpoint (a run
resumed on another number of workers may need any shard).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

STAGING_PREFIX = "raylane-fsdp-checkpoint-"


def staging_folder(token: str) -> Path:
    """The node-local folder a checkpoint passes through: the same path on every node for the same ``token``."""
    return Path(tempfile.gettempdir()) / f"{STAGING_PREFIX}{token}"


def remove_staging(token: str) -> None:
    shutil.rmtree(staging_folder(token), ignore_errors=True)


def local_copy(url: str, token: str) -> Path:
    """Where the checkpoint for ``url`` lies in the staging folder of ``token`` (its name is the URL's last part)."""
    return staging_folder(token) / Path(_filesystem(url)[1]).name


def clear(url: str) -> None:
    """Remove the checkpoint at ``url``: one object, or every object of a folder of shards. Also what an earlier save
    left there (a ``last.ckpt`` saved again, maybe by another number of ranks, whose extra shards would stay).

    Listed afresh (not from a listing cached before the upload) and removed object by object: an object store has no
    folders to remove."""
    filesystem, remote = _filesystem(url)
    filesystem.invalidate_cache()
    keys = filesystem.find(remote)
    if keys:
        filesystem.rm(keys)


def upload(local: Path, url: str) -> None:
    """Every file this node wrote under ``local`` (a checkpoint folder, or one file), to the same place under ``url``.
    Nothing, on a node whose ranks wrote nothing (a consolidated checkpoint is rank 0's alone)."""
    filesystem, remote = _filesystem(url)
    if local.is_file():
        filesystem.put_file(str(local), remote)
        return
    for file in sorted(path for path in local.rglob("*") if path.is_file()) if local.is_dir() else []:
        filesystem.put_file(str(file), f"{remote}/{file.relative_to(local).as_posix()}")


def download(url: str, local: Path) -> None:
    """The checkpoint at ``url`` (a distributed-checkpoint folder or one file), to ``local``."""
    filesystem, remote = _filesystem(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    if filesystem.isfile(remote):
        filesystem.get_file(remote, str(local))
        return
    files = filesystem.find(remote)
    if not files:
        raise FileNotFoundError(f"{url}: no checkpoint there (no object, and no folder of shards)")
    for file in files:
        target = local / Path(file).relative_to(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        filesystem.get_file(file, str(target))


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)  # type: ignore[no-any-return]
