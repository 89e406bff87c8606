"""The trial driver's side of a report: what rank 0 relayed becomes ``ray.tune.report`` in the trial's own thread.

The checkpoint arrives as bytes, so it reaches Tune's storage from the driver even when rank 0 ran on another node.
Tune persists it during ``report``; the local copy is removed right after. When a scheduler stops the trial,
``report`` ends the trial's thread by raising; the raylane launcher then stops the workers on its way out.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from raylane_tune import _ray_tune

log = logging.getLogger(__name__)

REPORT_TOPIC = "raylane_tune.report"
"""Relay topic of :class:`TuneReport` messages."""


@dataclass(frozen=True)
class TuneReport:
    """One report from rank 0: metric values, and the checkpoint's files (relative path -> bytes) if it saved one."""

    metrics: Mapping[str, float]
    checkpoint_files: Mapping[str, bytes] | None = None
    origin: str = field(default="")  # where rank 0 reported it ("on_validation_end at epoch 1, step 8"), for messages
    progress: tuple[str, int, int] | None = None  # (hook, epoch, global step): a restarted fit may replay it
    sender: str = ""  # the reporting callback's key, so the driver's copy of that callback receives it


def report_to_tune(message: TuneReport) -> None:
    """Report to the Tune trial this process runs (the driver's thread calling ``trainer.fit``)."""
    from ray import tune

    if not _ray_tune.in_tune_trial():
        log.warning("raylane_tune dropped a report from %s: this process runs no Ray Tune trial.", message.origin)
        return
    if message.checkpoint_files is None:
        tune.report(dict(message.metrics))
        return
    directory = Path(tempfile.mkdtemp(prefix="raylane_tune_checkpoint_"))
    try:
        write_tree(directory, message.checkpoint_files)
        tune.report(dict(message.metrics), checkpoint=tune.Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def read_tree(path: Path) -> dict[str, bytes]:
    """A checkpoint file, or every file of a checkpoint directory, by path relative to ``path``'s parent."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(file.relative_to(path.parent)): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}


def write_tree(directory: Path, files: Mapping[str, bytes]) -> None:
    for name, content in files.items():
        target = (directory / name).resolve()
        if directory.resolve() not in target.parents:
            raise ValueError(f"checkpoint file {name!r} would land outside {directory}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
