"""raylane's ``fsdp`` backend: hook implementations only. The strategy is imported when it is first used.

``get_strategy("fsdp", workers=N)`` shards parameters, gradients and optimizer state across the workers with torch's
FSDP2 (``fully_shard``), optionally on a 2D mesh with tensor parallelism (``tensor_parallel=k``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from raylane import hookimpl
from raylane.torch_distributed import join_process_group, leave_process_group
from raylane_fsdp.memory import pin_mmap_threshold
from raylane_fsdp.options import FSDP_OPTIONS, process_group_backend

if TYPE_CHECKING:
    from raylane import WorkerContext
    from raylane_fsdp.strategy import RayFSDPStrategy

__all__ = ["FSDP_OPTIONS"]


@hookimpl
def raylane_strategy_class(lightning: ModuleType) -> type[RayFSDPStrategy]:
    from raylane_fsdp.strategy import RayFSDPStrategy

    return RayFSDPStrategy.for_lightning(lightning)


@hookimpl
def raylane_backend_options() -> Mapping[str, str]:
    return FSDP_OPTIONS


@hookimpl
def raylane_resumes_on_any_world_size(backend_options: Mapping[str, Any]) -> bool:
    # Sharded (distributed-checkpoint) and full checkpoints both reshard on load. What must also hold for every count
    # of an elastic range is the mesh: no tensor parallelism, no fixed data-parallel or shard-group size.
    return (
        backend_options.get("tensor_parallel", 1) == 1
        and "data_parallel" not in backend_options
        and isinstance(backend_options.get("hybrid_shard", False), bool)
    )


@hookimpl
def raylane_setup_process_group(context: WorkerContext) -> None:
    if not context.uses_gpu or context.backend_options.get("cpu_offload"):
        pin_mmap_threshold()  # FSDP's per-unit CPU buffers would otherwise fragment the heap (raylane_fsdp.memory)
    # Joined here, before Lightning's setup_environment, which then finds the group and does not make its own.
    join_process_group(
        context, process_group_backend(context.backend_options.get("process_group_backend"), context.uses_gpu)
    )


@hookimpl
def raylane_teardown_process_group() -> None:
    leave_process_group()
