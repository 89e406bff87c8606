"""Which driver environment variables reach the workers, and the rank variables every backend expects.

Ray actors inherit the raylet's environment, not the driver's. Forwarding all of it would leak machine-specific
settings (paths, tokens) across nodes, so only an explicit allow-list travels, plus what the user passes as ``env=``.
"""

from __future__ import annotations

from collections.abc import Mapping

from raylane.context import WorkerContext

# Variables that change what training computes or how it communicates.
FORWARDED_NAMES = frozenset(
    {
        "PL_GLOBAL_SEED",
        "PL_SEED_WORKERS",
        "CUBLAS_WORKSPACE_CONFIG",
        "TORCH_DISTRIBUTED_DEBUG",
        "TORCH_CPP_LOG_LEVEL",
        "TORCH_SHOW_CPP_STACKTRACES",
        "GLOO_SOCKET_IFNAME",
        "TP_SOCKET_IFNAME",
        "PYTHONHASHSEED",
    }
)
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "RAYLANE_")


def forwarded_env(driver_env: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed subset of the driver's environment."""
    return {
        name: value
        for name, value in driver_env.items()
        if name in FORWARDED_NAMES or name.startswith(FORWARDED_PREFIXES)
    }


def rank_env(context: WorkerContext) -> dict[str, str]:
    """The torch.distributed / Lightning rank variables for one worker."""
    env = {
        "MASTER_ADDR": context.master_addr,
        "MASTER_PORT": str(context.master_port),
        "WORLD_SIZE": str(context.world_size),
        "RANK": str(context.global_rank),
        "LOCAL_RANK": str(context.local_rank),
        "NODE_RANK": str(context.node_rank),
        "LOCAL_WORLD_SIZE": str(context.ranks.local_world_size),
        "GROUP_RANK": str(context.node_rank),
        # Rank 0's actor already serves the store at MASTER_PORT (Worker.open_rendezvous): connect, never host one.
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    if context.devices.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = context.devices.cuda_visible_devices
    return env
