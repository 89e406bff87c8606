"""How a model is cut into FSDP units and sharded on a worker, when its LightningModule does not do it itself.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns each unit's parameters into DTensors sharded across the mesh and
gathers one unit at a time around its forward and backward, so the peak memory is the shards plus the largest unit.
Units are chosen bottom-up (inner units first, never a module twice), and the root is always the last unit: it owns
the parameters no inner unit took.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raylane_fsdp.options import FSDPConfig

# predict_step is left out here: registered for good, it hangs a streamed predict (measured with Ray Data, where the
# strategy gathers the whole model first and the ranks run different numbers of steps). The strategy registers it for
# predict data with a length only (RayFSDPStrategy.on_predict_start), where every rank runs the same number of steps.
STEP_METHODS = ("training_step", "validation_step", "test_step")


def missing_module_names(module: nn.Module, names: Iterable[str]) -> list[str]:
    """The class names in ``names`` that no submodule of ``module`` has."""
    present = {type(submodule).__name__ for submodule in module.modules()}
    return [name for name in names if name not in present]


def describe_missing(module: nn.Module, option: str, missing: list[str]) -> str:
    present = sorted({type(submodule).__name__ for submodule in module.modules()})
    return (
        f"{option} names {', '.join(missing)}, which the model ({type(module).__name__}) does not contain; its module "
        f"classes are: {', '.join(present)}. Name classes the model has (check spelling), or leave {option} out."
    )


def is_sharded(module: nn.Module) -> bool:
    """True when ``fully_shard`` was already applied somewhere in ``module`` (by the LightningModule's own
    ``configure_model``): the strategy then leaves the sharding to it."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(submodule, FSDPModule) for submodule in module.modules())


def shard_units(module: nn.Module, config: FSDPConfig, manual_optimization: bool = False) -> list[nn.Module]:
    """The submodules that become their own FSDP unit, inner ones first (the root is not among them).

    With ``wrap_modules``: every submodule of those classes. Otherwise every submodule that, once its inner units are
    taken out, still holds at least ``min_wrap_params`` parameters. With ``manual_optimization``, also every submodule
    that holds parameters of its own outside those units, so that the root keeps none (see :func:`shard_model`).
    """
    units = _chosen_units(module, config)
    if not manual_optimization:
        return units
    inside_units = {id(inner) for unit in units for inner in unit.modules()}
    owners = {
        id(submodule)
        for submodule in module.modules()
        if submodule is not module
        and id(submodule) not in inside_units
        and next(submodule.parameters(recurse=False), None) is not None
    }
    wanted = owners | {id(unit) for unit in units}
    return [submodule for submodule in reversed(list(module.modules())) if id(submodule) in wanted]  # inner first


def _chosen_units(module: nn.Module, config: FSDPConfig) -> list[nn.Module]:
    if config.wrap_modules:
        wanted = set(config.wrap_modules)
        return [m for m in reversed(list(module.modules())) if m is not module and type(m).__name__ in wanted]
    units: list[nn.Module] = []

    def remaining_params(current: nn.Module) -> int:
        # Parameters in ``current``'s subtree that no inner unit took; a module that becomes a unit passes on none.
        count = sum(p.numel() for p in current.parameters(recurse=False))
        count += sum(remaining_params(child) for child in current.children())
        if current is not module and count >= config.min_wrap_params:
            units.append(current)
            return 0
        return count

    remaining_params(module)
    return units


def shard_model(
    module: nn.Module, config: FSDPConfig, mesh: Any, uses_gpu: bool, manual_optimization: bool = False
) -> list[nn.Module]:
    """Activation checkpointing, then ``fully_shard`` on every unit and the root. Returns the units (root last).

    Under manual optimization, ``training_step`` runs the backward passes and optimizer steps itself, and FSDP2 does
    not reduce the gradients of a backward that runs inside one of a unit's forwards: registering ``training_step``
    as the root's forward (as below for automatic optimization) would leave every parameter of the root unit without
    a gradient and untrained, silently. The step's direct layer calls are served instead by making every submodule
    that holds parameters a unit of its own (or part of one), each gathering its parameters around its own forward.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    checkpoint_activations(module, config.activation_checkpointing)
    options: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": config.reshard_after_forward,
        "mp_policy": mixed_precision_policy(config),
        "offload_policy": CPUOffloadPolicy(pin_memory=uses_gpu) if config.cpu_offload else OffloadPolicy(),
    }
    units = [*shard_units(module, config, manual_optimization), module]
    for unit in units:
        fully_shard(unit, **options)
    # The root unit gathers its own parameters when its forward runs, but a LightningModule's steps often call its
    # layers directly (self.layer(x), not self(x)): its step methods then count as forwards too.
    for name in STEP_METHODS:
        if name == "training_step" and manual_optimization:
            continue
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return units


def mixed_precision_policy(config: FSDPConfig) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if config.mixed_precision_policy is not None:
        return config.mixed_precision_policy
    dtypes = {name: getattr(torch, dtype) for name, dtype in (config.mixed_precision or {}).items()}
    return MixedPrecisionPolicy(**dtypes)


def checkpoint_activations(module: nn.Module, class_names: Iterable[str]) -> None:
    """Recompute the forward of every submodule of these classes in the backward pass instead of keeping its
    activations. The module's own forward is wrapped, so parameter names (and checkpoints) do not change."""
    wanted = set(class_names)
    for submodule in module.modules():
        if type(submodule).__name__ in wanted and submodule is not module:
            submodule.forward = functools.partial(_recomputed_forward, submodule.forward)  # type: ignore[method-assign]


def _recomputed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def materialize(module: nn.Module, device: torch.device) -> bool:
    """Give parameters created on the ``meta`` device (``trainer.init_module(empty_init=True)``, or in
    ``configure_model``) real memory on ``device`` and initialise them: each sharded rank allocates only its shard.

    Tensors that hold values already keep them (layers built in ``__init__`` whose trained weights the driver sent
    for a later entry point): ``to_empty`` is applied to the whole module, which FSDP2 needs to register the new
    shards, and would otherwise leave those tensors uninitialised too. Returns whether any tensor was on meta.
    """
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if not any(tensor.is_meta for tensor in tensors.values()):
        return False
    values = {name: tensor.detach().clone() for name, tensor in tensors.items() if not tensor.is_meta}
    module.to_empty(device=device)
    for submodule in module.modules():
        reset = getattr(submodule, "reset_parameters", None)
        if callable(reset):
            reset()
    materialized = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    with torch.no_grad():
        for name, value in values.items():
            materialized[name].copy_(value)
    return True
