"""Sharded optimizers from the ones a LightningModule configured: how they are built, how the LR schedulers keep
driving them, and how much optimizer state each process holds."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor
from torch.optim import Optimizer


def same_optimizer_kwargs(optimizer: Optimizer) -> dict[str, Any]:
    """Constructor arguments that rebuild ``optimizer``'s class with its hyperparameters.

    torch keeps them in ``defaults``, but not only the constructor's: ``AdamW`` is an ``Adam`` whose defaults hold
    ``decoupled_weight_decay=True``, which ``AdamW()`` does not take (it sets it itself). Only the names the
    constructor takes are passed, unless it takes any keyword; each param group keeps all of its own values.
    """
    parameters = inspect.signature(type(optimizer).__init__).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return dict(optimizer.defaults)
    return {name: value for name, value in optimizer.defaults.items() if name in parameters}


def has_parameters(optimizer: Optimizer) -> bool:
    """False for Lightning's stand-in when ``configure_optimizers`` returns none: there is nothing to shard."""
    return any(group["params"] for group in optimizer.param_groups)


def share_param_groups(configured: Optimizer, sharded: Optimizer) -> None:
    """Make ``configured`` (which the LightningModule's LR schedulers hold) show the sharded optimizer's groups.

    Learning-rate schedulers and ``LearningRateMonitor`` read and write ``scheduler.optimizer.param_groups``, and the
    sharded optimizers copy their groups' hyperparameters to the shard's optimizer before every step. Loading a
    checkpoint replaces the sharded optimizer's group dicts, so this runs again after every load.
    """
    if configured is not sharded:
        configured.param_groups = sharded.param_groups


def local_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of the tensors in the optimizer state this process holds: only its shard's, for a sharded optimizer.

    FairScale's OSS and torch's ZeroRedundancyOptimizer keep the shard's state in the optimizer they wrap (``optim``).
    """
    inner = getattr(optimizer, "optim", None)
    state = inner.state if isinstance(inner, Optimizer) else optimizer.state
    return sum(
        value.numel() * value.element_size()
        for param_state in state.values()
        for value in param_state.values()
        if isinstance(value, Tensor)
    )
