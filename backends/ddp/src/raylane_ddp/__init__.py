"""raylane's ``ddp`` backend: hook implementations only. The strategy class is imported when it is first used."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING

from raylane import hookimpl
from raylane.torch_distributed import join_process_group, leave_process_group

if TYPE_CHECKING:
    from raylane import WorkerContext
    from raylane_ddp.strategy import RayDDPStrategy

# Passed through to torch's DistributedDataParallel (and Lightning's DDPStrategy for the comm-hook ones).
DDP_OPTIONS: Mapping[str, str] = {
    "find_unused_parameters": "DDP: allow parameters that get no gradient in a step",
    "static_graph": "DDP: the graph is the same every step (enables optimisations)",
    "gradient_as_bucket_view": "DDP: gradients are views into the allreduce buckets (saves memory)",
    "bucket_cap_mb": "DDP: allreduce bucket size in MiB",
    "broadcast_buffers": "DDP: broadcast module buffers from rank 0 every forward",
    "ddp_comm_hook": "Lightning DDPStrategy: a DDP communication hook (GPU workers only)",
    "ddp_comm_state": "Lightning DDPStrategy: state for the communication hook",
    "ddp_comm_wrapper": "Lightning DDPStrategy: wrapper for the communication hook (e.g. fp16 compression)",
    "model_averaging_period": "Lightning DDPStrategy: period for post-local SGD model averaging",
    "process_group_backend": "'nccl' or 'gloo'; default nccl on GPUs, gloo on CPUs (gloo lets workers share a GPU)",
}
PROCESS_GROUP_BACKENDS = ("nccl", "gloo")


@hookimpl
def raylane_strategy_class(lightning: ModuleType) -> type[RayDDPStrategy]:
    from raylane_ddp.strategy import RayDDPStrategy

    return RayDDPStrategy.for_lightning(lightning)


@hookimpl
def raylane_backend_options() -> Mapping[str, str]:
    return DDP_OPTIONS


@hookimpl
def raylane_resumes_on_any_world_size() -> bool:
    # Every rank holds the whole model and optimizer state: a checkpoint loads on any number of workers.
    return True


@hookimpl
def raylane_setup_process_group(context: WorkerContext) -> None:
    join_process_group(
        context, process_group_backend(context.backend_options.get("process_group_backend"), context.uses_gpu)
    )


def process_group_backend(requested: str | None, uses_gpu: bool) -> str:
    """The torch.distributed backend: what the user asked for, else nccl on GPUs and gloo on CPUs."""
    if requested is None:
        return "nccl" if uses_gpu else "gloo"
    if requested not in PROCESS_GROUP_BACKENDS:
        raise ValueError(f"process_group_backend={requested!r}; use one of {', '.join(PROCESS_GROUP_BACKENDS)}.")
    if requested == "nccl" and not uses_gpu:
        raise ValueError("process_group_backend='nccl' needs GPUs; pass use_gpu=True or use 'gloo'.")
    return requested


@hookimpl
def raylane_teardown_process_group() -> None:
    leave_process_group()
