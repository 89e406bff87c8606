"""What the backend decides before Horovod is touched: its options, and the HOROVOD_* environment of each worker.

Pure functions of the options and the worker's context, so they are tested without Ray or Horovod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raylane import ConfigurationError, WorkerContext

BACKEND_OPTIONS: Mapping[str, str] = {
    "compression": "Horovod: gradient compression on the wire, 'none' (default) or 'fp16'",
    "op": "Horovod: how gradients combine across workers, 'average' (default, like DDP) or 'sum'",
    "gradient_predivide_factor": "Horovod: with op='average', divide gradients by this before the sum, the rest after",
    "sparse_as_dense": "Horovod: allreduce sparse gradients (embeddings) as dense tensors",
}
COMPRESSIONS = ("none", "fp16")
# Adasum is left out: Horovod runs it on CPUs only through MPI, and its optimizer cannot defer synchronisation, which
# gradient clipping and accumulation here rely on.
OPS = ("average", "sum")

# The gloo rendezvous keys each worker's "local" scope by this name; the Ray node id is unique even where several
# Ray nodes share one IP (containers, the multi-node test cluster).
HOSTNAME_VARIABLE = "HOROVOD_HOSTNAME"
# Stall checks run at most this often: Horovod's default warning interval.
MAX_STALL_CHECK_S = 60


@dataclass(frozen=True)
class OptimizerSettings:
    """How ``hvd.DistributedOptimizer`` combines gradients. Validated on the driver, used on the workers."""

    compression: str = "none"
    op: str = "average"
    gradient_predivide_factor: float = 1.0
    sparse_as_dense: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> OptimizerSettings:
        compression = _choice("compression", options.get("compression", "none"), COMPRESSIONS)
        op = _choice("op", options.get("op", "average"), OPS)
        factor = options.get("gradient_predivide_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ConfigurationError(f"gradient_predivide_factor must be a number above 0, got {factor!r}.")
        if factor != 1.0 and op != "average":
            raise ConfigurationError(
                f"gradient_predivide_factor={factor} only applies to op='average' (got op={op!r}); drop one of them."
            )
        sparse_as_dense = options.get("sparse_as_dense", False)
        if not isinstance(sparse_as_dense, bool):
            raise ConfigurationError(f"sparse_as_dense must be True or False, got {sparse_as_dense!r}.")
        return cls(compression, op, float(factor), sparse_as_dense)


def _choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ConfigurationError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")
    return value.lower()


@dataclass(frozen=True)
class StallTimeouts:
    """Horovod's stall inspector, set so a rank that stops joining collectives fails the run within ``budget_s``."""

    check_s: int
    shutdown_s: int
    gloo_s: int

    @classmethod
    def within(cls, budget_s: float) -> StallTimeouts:
        """Rank 0 checks every ``check_s`` and shuts Horovod down once a collective waited ``shutdown_s``.

        A stalled gradient allreduce that hit Horovod's response cache is first evicted from it (after one check
        interval), then times out, then waits for the next check: ``shutdown_s + 2 * check_s`` fits the budget.
        Horovod counts whole seconds and never shuts down before the first check.
        """
        budget = max(int(budget_s), 3)
        check = min(MAX_STALL_CHECK_S, max(1, budget // 10))
        shutdown = max(check, budget - 2 * check)
        # Gloo's own timeout bounds the rendezvous and a peer whose Horovod thread stopped answering. Connecting takes
        # a while on a loaded machine, so it never drops below Horovod's default.
        return cls(check_s=check, shutdown_s=shutdown, gloo_s=max(budget, 30))


def horovod_env(context: WorkerContext) -> dict[str, str]:
    """The HOROVOD_* variables of one worker, known on the driver (the cross-node ranks are added on the worker)."""
    timeouts = StallTimeouts.within(context.options.collective_timeout)
    return {
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": context.master_addr,
        "HOROVOD_RANK": str(context.global_rank),
        "HOROVOD_SIZE": str(context.world_size),
        "HOROVOD_LOCAL_RANK": str(context.local_rank),
        "HOROVOD_LOCAL_SIZE": str(context.ranks.local_world_size),
        HOSTNAME_VARIABLE: context.placement.node_id,
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(timeouts.gloo_s),
        "HOROVOD_STALL_CHECK_TIME_SECONDS": str(timeouts.check_s),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(timeouts.shutdown_s),
    }


def cross_ranks(layout: Mapping[int, tuple[int, int]], global_rank: int) -> tuple[int, int]:
    """Horovod's cross rank and size: this worker's place among the workers with its local rank, one per node.

    ``layout`` maps every global rank to its (node rank, local rank). Nodes may hold different numbers of workers, so
    the size differs between local ranks (local rank 2 exists only on nodes with three or more workers).
    """
    node_rank, local_rank = layout[global_rank]
    peers = sorted(node for node, local in layout.values() if local == local_rank)
    return peers.index(node_rank), len(peers)
