"""raylane's ``deepspeed`` backend: hook implementations only. DeepSpeed and the strategy are imported when first used.

``get_strategy("deepspeed", workers=N, stage=3, offload_optimizer=True)`` trains with DeepSpeed ZeRO through
Lightning's ``DeepSpeedStrategy``; see the package README for the options and what comes back to the driver.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING

from raylane import hookimpl
from raylane.torch_distributed import join_process_group, leave_process_group
from raylane_deepspeed.config import BACKEND_OPTIONS

if TYPE_CHECKING:
    from raylane import WorkerContext
    from raylane_deepspeed.strategy import RayDeepSpeedStrategy

__all__ = ["BACKEND_OPTIONS"]


@hookimpl
def raylane_strategy_class(lightning: ModuleType) -> type[RayDeepSpeedStrategy]:
    from raylane_deepspeed.strategy import RayDeepSpeedStrategy

    return RayDeepSpeedStrategy.for_lightning(lightning)


@hookimpl
def raylane_backend_options() -> Mapping[str, str]:
    return BACKEND_OPTIONS


@hookimpl
def raylane_resumes_on_any_world_size() -> bool:
    # ZeRO checkpoints hold each rank's partition of the optimizer state, and DeepSpeed (0.19.8,
    # engine._load_zero_checkpoint) refuses to load them on another data-parallel world size unless they were
    # converted offline to its universal format. So workers=(min, max) is refused when the strategy is built.
    return False


@hookimpl
def raylane_worker_env(context: WorkerContext) -> Mapping[str, str]:
    # DeepSpeed picks its accelerator once per process, from CUDA's presence; a CPU worker on a GPU node must not get
    # CUDA's. Its CPU accelerator runs ZeRO over the gloo group below (measured with DeepSpeed 0.19.8, torch 2.13).
    return {} if context.uses_gpu else {"DS_ACCELERATOR": "cpu"}


@hookimpl
def raylane_setup_process_group(context: WorkerContext) -> None:
    """One torch process group (nccl on GPUs, gloo on CPUs), which DeepSpeed's communication layer then wraps instead
    of creating its own."""
    import deepspeed

    join_process_group(context, "nccl" if context.uses_gpu else "gloo")
    deepspeed.init_distributed(dist_backend="nccl" if context.uses_gpu else "gloo", dist_init_required=False)
    _bound_deepspeed_world_group(context)


def _bound_deepspeed_world_group(context: WorkerContext) -> None:
    """Give DeepSpeed's copy of the world group the run's ``collective_timeout``.

    DeepSpeed reduces gradients and gathers parameters in a clone of the world group that it creates on first use
    with torch's default timeout (30 minutes), so a rank that stopped would keep the others waiting that long instead
    of ``collective_timeout``. Creating the clone here, before DeepSpeed does, is the one use of DeepSpeed's private
    API (``deepspeed.utils.groups._WORLD_GROUP``); the teardown's ``destroy_process_group`` clears it again. The
    conformance test ``test_a_rank_that_never_joins_a_collective_is_named_within_collective_timeout`` fails when it
    stops working.
    """
    from datetime import timedelta

    import torch.distributed as dist
    from deepspeed.utils import groups

    timeout = timedelta(seconds=context.options.collective_timeout)
    groups._WORLD_GROUP = dist.new_group(ranks=list(range(context.world_size)), timeout=timeout)


@hookimpl
def raylane_teardown_process_group() -> None:
    comm = sys.modules.get("deepspeed.comm")
    if comm is not None and comm.is_initialized():
        comm.destroy_process_group()  # also drops the subgroups DeepSpeed cached for this world
    leave_process_group()
