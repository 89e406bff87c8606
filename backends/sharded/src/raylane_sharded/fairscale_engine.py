"""The ``fairscale`` engine: FairScale's OSS shards optimizer state, its ShardedDataParallel shards gradients.

Each parameter belongs to one rank. In the backward pass every gradient is reduced to its owner only (not
all-reduced), the owner steps the parameters it owns, and the updated parameters are broadcast back: optimizer state
and, with ``reduce_buffer_size=0``, gradients each take about 1/N of the memory DDP needs (ZeRO stages 1 and 2).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from fairscale.nn.data_parallel import ShardedDataParallel
from fairscale.optim import OSS
from torch.nn import Module
from torch.optim import Optimizer

from raylane_sharded.optimizers import same_optimizer_kwargs


class ModeFollowingShardedDataParallel(ShardedDataParallel):
    """ShardedDataParallel whose train/eval mode follows the module it wraps.

    ShardedDataParallel installs its gradient-reduce hooks only while its own ``training`` flag is set. Lightning's
    evaluation loops put ``trainer.model`` (this wrapper) into eval mode but restore the train mode of the
    LightningModule alone, so after the sanity check or any validation the wrapper stayed in eval mode and every rank
    stepped with its local gradients: different weights from DDP and from one process.
    """

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        self.training = self.module.training  # the wrapper's own flag only; its children already have theirs
        return super().forward(*inputs, **kwargs)


class FairScaleEngine:
    """OSS + ShardedDataParallel with the backend's options."""

    wraps_module_itself = True

    def __init__(
        self,
        reduce_buffer_size: int = 0,
        broadcast_buffers: bool = True,
        auto_refresh_trainable: bool = True,
        broadcast_fp16: bool = False,
    ) -> None:
        self.reduce_buffer_size = reduce_buffer_size
        self.broadcast_buffers = broadcast_buffers
        self.auto_refresh_trainable = auto_refresh_trainable
        self.broadcast_fp16 = broadcast_fp16

    def shard_optimizer(self, optimizer: Optimizer) -> Optimizer:
        if isinstance(optimizer, OSS):
            return optimizer
        return OSS(
            optimizer.param_groups,
            optim=type(optimizer),
            broadcast_fp16=self.broadcast_fp16,
            **same_optimizer_kwargs(optimizer),
        )

    def wrap_module(self, module: Module, optimizers: list[Optimizer]) -> Module:
        sharded = [optimizer for optimizer in optimizers if isinstance(optimizer, OSS)]
        return ModeFollowingShardedDataParallel(
            module,
            sharded_optimizer=sharded,
            broadcast_buffers=self.broadcast_buffers,
            reduce_buffer_size=self.reduce_buffer_size,
            auto_refresh_trainable=self.auto_refresh_trainable,
        )

    def no_sync(self, module: Module) -> AbstractContextManager[Any] | None:
        return module.no_sync() if isinstance(module, ShardedDataParallel) else None

    def unwrap(self, module: Module) -> Module | None:
        return module.module if isinstance(module, ShardedDataParallel) else None

    def clip_grad_norm(self, optimizer: Optimizer, max_norm: float) -> bool:
        """Clip by the norm over every rank's gradients. A rank holds only its own shard's gradients, so the norm
        torch's ``clip_grad_norm_`` would compute locally is wrong; OSS all-reduces the shard norms."""
        if not isinstance(optimizer, OSS):
            return False
        optimizer.clip_grad_norm(max_norm)
        return True
