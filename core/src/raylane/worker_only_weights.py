"""Trained weights of layers only the workers build, kept with the driver's model for its next entry point.

Lightning's advice for models too big for one process is to create layers in ``configure_model``. On raylane those
layers exist on the workers alone: after ``fit`` the driver's LightningModule has no place for their trained weights.
In one process, the next ``validate``/``test``/``predict`` (or a second ``fit``) would keep the trained layers, since
``configure_model`` is written to skip layers that exist. So the driver keeps those tensors with the module (they
travel with it in the next payload), and each worker loads them right after its ``configure_model`` built the layers,
before any sharding engine or optimizer takes the parameters over. A ``ckpt_path`` still wins: Lightning restores it
later.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

ATTRIBUTE = "_raylane_worker_only_weights"
# torch.compile(submodule) on the workers names that submodule's weights "<name>._orig_mod.<...>".
COMPILED_PREFIX = "_orig_mod."


def keep(module: torch.nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Keep ``weights`` (by state-dict name) with ``module``, replacing what an earlier fit kept."""
    if weights:
        # Copies: the received tensors view Ray's object store, which must not stay pinned by them.
        module.__dict__[ATTRIBUTE] = {name: tensor.detach().clone() for name, tensor in weights.items()}
    else:
        module.__dict__.pop(ATTRIBUTE, None)


def kept(module: torch.nn.Module) -> dict[str, Tensor]:
    """The trained weights kept with ``module`` that its own parameters and buffers do not hold."""
    return dict(module.__dict__.get(ATTRIBUTE, {}))


def trained_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with the trained weights of the layers only the workers built.

    After ``fit`` on raylane, the LightningModule you passed holds every trained weight it has a place for; layers its
    ``configure_model`` creates exist on the workers only, and their weights are kept beside it. Save this, not
    ``module.state_dict()``, to have all of them in one file (the fit's checkpoints hold them too).
    """
    return {**module.state_dict(), **kept(module)}


def copy_into(module: torch.nn.Module, weights: Mapping[str, Tensor]) -> list[str]:
    """Copy full tensors into ``module``'s parameters and buffers of the same names, in place; returns the names
    copied. A parameter sharded as a DTensor (FSDP2, tensor parallelism) takes its own shard of the full tensor; one
    on the meta device (not materialised yet) is left alone."""
    targets = named_tensors(module)
    copied = []
    with torch.no_grad():
        for name, full in weights.items():
            target = targets.get(name)
            if target is None or target.is_meta:
                continue
            target.copy_(_shaped_like(full, target))
            copied.append(name)
    return copied


def named_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by state-dict name, also under the name torch.compile's wrapper hides."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return {**{plain_name(name): tensor for name, tensor in tensors.items()}, **tensors}


def plain_name(name: str) -> str:
    """A state-dict name without what torch.compile's wrapper adds (``head._orig_mod.weight``: ``head.weight``)."""
    return name.replace(COMPILED_PREFIX, "")


def _shaped_like(full: Tensor, target: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return full
    # Every rank received the same full tensor, so each cuts its own shard without communicating.
    return distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
