"""Workarounds for gaps in raylane's core that Tune exposes. Each goes once the core fixes it (see README.md).

``raylane.WorkerError`` takes keyword-only arguments, so ``copy.copy`` and ``pickle`` cannot rebuild it from its
``args``. Tune copies a trial's exception to strip internal frames, and Ray pickles it to the driver, so a trial whose
worker failed would be reported as a ``TypeError`` about ``WorkerError.__init__`` instead of the worker's failure.

Every process that pickles a WorkerError must have the reducer: the trial (registered by the placement hook before
the workers start) and Tune's driver, which pickles the trial's error again. A WorkerError pickled with the reducer
imports this module wherever it is unpickled, which registers it there too.
"""

from __future__ import annotations

import copyreg
from typing import Any

from raylane.errors import WorkerError


def make_worker_error_copyable() -> None:
    """Register how to rebuild a WorkerError, for ``copy`` and ``pickle`` alike. Idempotent."""
    copyreg.pickle(WorkerError, _reduce_worker_error)


def _reduce_worker_error(error: WorkerError) -> tuple[Any, ...]:
    return _rebuild_worker_error, (str(error), error.rank, error.node_ip, error.node_id)


def _rebuild_worker_error(message: str, rank: int, node_ip: str, node_id: str) -> WorkerError:
    return WorkerError(message, rank=rank, node_ip=node_ip, node_id=node_id)


make_worker_error_copyable()
