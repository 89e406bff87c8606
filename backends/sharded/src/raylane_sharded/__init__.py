"""raylane's ``sharded`` backend: hook implementations only. Strategy and engines are imported when first used.

``get_strategy("sharded", workers=N)`` shards optimizer state across the workers with FairScale (``engine="zero"``:
torch's ZeroRedundancyOptimizer); see the package README for which engine to pick.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING

from raylane import hookimpl
from raylane.torch_distributed import join_process_group, leave_process_group
from raylane_sharded.engines import DEFAULT_ENGINE, ENGINE_OPTIONS, ENGINES

if TYPE_CHECKING:
    from raylane import WorkerContext
    from raylane_sharded.strategy import RayShardedStrategy

__all__ = ["DEFAULT_ENGINE", "ENGINES", "ENGINE_OPTIONS"]


@hookimpl
def raylane_strategy_class(lightning: ModuleType) -> type[RayShardedStrategy]:
    from raylane_sharded.strategy import RayShardedStrategy

    return RayShardedStrategy.for_lightning(lightning)


@hookimpl
def raylane_backend_options() -> Mapping[str, str]:
    return ENGINE_OPTIONS


@hookimpl
def raylane_resumes_on_any_world_size() -> bool:
    # Checkpoints hold the optimizer state consolidated on rank 0 (see RayShardedStrategy), which any number of
    # workers shard afresh on load.
    return True


@hookimpl
def raylane_setup_process_group(context: WorkerContext) -> None:
    join_process_group(context, "nccl" if context.uses_gpu else "gloo")


@hookimpl
def raylane_teardown_process_group() -> None:
    leave_process_group()
