"""torch.distributed for backends built on it (ddp, sharded, third-party ones): join and leave one run's group.

The core already serves the run's store on rank 0 (see :meth:`raylane.worker.Worker.open_rendezvous`); these two
calls are what a backend's ``raylane_setup_process_group`` / ``raylane_teardown_process_group`` hooks need.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raylane.context import WorkerContext


def join_process_group(context: WorkerContext, backend: str) -> None:
    """Initialise the default process group of this worker's run with ``backend`` (``"gloo"``, ``"nccl"`` ...).

    Collectives block at most ``collective_timeout`` seconds, so a rank that stops participating becomes an error.
    """
    import torch.distributed as dist

    leave_process_group()  # a previous entry point in this process failed before its teardown
    dist.init_process_group(
        backend=backend,
        init_method=context.init_method,
        rank=context.global_rank,
        world_size=context.world_size,
        timeout=timedelta(seconds=context.options.collective_timeout),
    )


def leave_process_group() -> None:
    """Destroy the default process group, if any. Safe to repeat."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


_group_from_backend: object | None = None


def record_backend_group() -> None:
    """Remember the default process group as the backend's setup hook left it (the worker calls this right after
    ``raylane_setup_process_group``), so a test can tell it from a group Lightning made later on its own."""
    global _group_from_backend
    import torch.distributed as dist

    _group_from_backend = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def group_in_use_is_the_backends() -> bool:
    """Whether the default process group in use now is the one the backend's setup hook made (or both are absent,
    as for a backend whose communication is not torch.distributed, such as Horovod)."""
    import torch.distributed as dist

    in_use = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return in_use is _group_from_backend
