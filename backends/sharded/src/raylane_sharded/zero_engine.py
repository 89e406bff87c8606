"""The ``zero`` engine: torch's own ZeroRedundancyOptimizer shards optimizer state; DistributedDataParallel all-reduces
gradients as usual (ZeRO stage 1).

Only torch is needed, and DDP's bucketed all-reduce overlaps with the backward pass; gradients are not sharded, so the
saving is the optimizer state alone (Adam: two of the four model-sized tensors per rank).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn import Module
from torch.optim import Optimizer

from raylane_sharded.optimizers import same_optimizer_kwargs


class ZeroEngine:
    """ZeroRedundancyOptimizer; the strategy's DistributedDataParallel reduces the gradients."""

    wraps_module_itself = False

    def __init__(
        self,
        broadcast_buffers: bool = True,
        find_unused_parameters: bool = False,
        parameters_as_bucket_view: bool = False,
    ) -> None:
        # broadcast_buffers and find_unused_parameters reach DDP through the strategy (EngineSpec.ddp_options).
        self.parameters_as_bucket_view = parameters_as_bucket_view

    def shard_optimizer(self, optimizer: Optimizer) -> Optimizer:
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            return optimizer
        return ZeroRedundancyOptimizer(
            optimizer.param_groups,
            optimizer_class=type(optimizer),
            parameters_as_bucket_view=self.parameters_as_bucket_view,
            **same_optimizer_kwargs(optimizer),
        )

    def wrap_module(self, module: Module, optimizers: list[Optimizer]) -> Module:
        raise NotImplementedError("the zero engine's module is wrapped by the strategy's DistributedDataParallel")

    def no_sync(self, module: Module) -> AbstractContextManager[Any] | None:
        return None  # DDP's own no_sync, which the strategy uses

    def unwrap(self, module: Module) -> Module | None:
        return None

    def clip_grad_norm(self, optimizer: Optimizer, max_norm: float) -> bool:
        return False  # DDP leaves every rank with every gradient, so Lightning's own clipping is right
