"""Reading the ``fsdp`` backend's checkpoints in one process, without workers or a process group.

A sharded checkpoint (the default, ``state_dict_type="sharded"``) is a torch distributed-checkpoint directory: one
``.distcp`` file per rank with its shards of the weights and optimizer state, plus Lightning's ``meta.pt`` with the
rest (loop progress, callbacks, LR schedulers). :func:`load_full_checkpoint` reads it, or a consolidated file, as one
dictionary; :func:`consolidate_checkpoint` writes it as one ordinary ``torch.save`` file.

Resuming needs neither: ``trainer.fit(..., ckpt_path=directory_or_file)`` reshards either onto any number of workers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def load_full_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole checkpoint at ``path`` (a sharded directory or a file) as one dictionary on the CPU.

    ``checkpoint["state_dict"]`` holds the full weights under the LightningModule's parameter names. A sharded
    checkpoint's optimizer states stay keyed by parameter name (``checkpoint["optimizer_0"]``, as torch's
    distributed checkpoint stores them); a consolidated file holds Lightning's ``optimizer_states`` list.
    """
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)  # type: ignore[no-any-return]
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is neither a checkpoint file nor a torch distributed-checkpoint directory")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        merged = Path(scratch) / "merged.pt"
        dcp_to_torch_save(path, merged)
        tensors = torch.load(merged, map_location="cpu", weights_only=False)
    metadata = path / METADATA_FILE
    rest = torch.load(metadata, map_location="cpu", weights_only=False) if metadata.is_file() else {}
    return {**rest, **tensors}


def consolidate_checkpoint(path: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """Write the checkpoint at ``path`` as one ``torch.save`` file at ``destination`` (for tools that read one
    file); returns ``destination``."""
    destination = Path(destination)
    torch.save(load_full_checkpoint(path), destination)
    return destination
