"""Full weights into a ZeRO-3 model, whose parameters every rank holds only a partition of.

Two callers: layers only ``configure_model`` builds, which take the weights the driver kept for them
(:mod:`raylane.worker_only_weights`), and ``validate``/``test``/``predict`` given a ZeRO-3 checkpoint, which DeepSpeed
0.19 cannot load: Lightning builds the engine of an evaluation without an optimizer, and after reading the
checkpoint's module file the engine asks its parameter-offload manager to restore the weights from 16-bit copies it
does not have (``AttributeError: 'DeepSpeedZeRoOffload' object has no attribute '_restore_from_bit16_weights'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from raylane import worker_only_weights
from raylane.worker_only_weights import plain_name
from raylane_deepspeed.checkpoints import CHECKPOINT_TAG, consolidated_state_dict

# What DeepSpeed's engine keeps for itself in a checkpoint's module file; the rest is Lightning's checkpoint (loops,
# callbacks, hyper-parameters), which Lightning restores.
ENGINE_KEYS = ("module", "optimizer", "lr_scheduler", "skipped_steps", "global_steps", "dp_world_size", "mp_world_size")


def copy_into_partitions(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], names: set[str]) -> None:
    """Copy ``weights`` into the parameters and buffers of ``module`` named in ``names``, on every rank at once.

    Every rank passes the same ``names``; only rank 0's ``weights`` count (the others may pass none). The partitioned
    parameters are gathered one submodule at a time, so no rank holds more than one submodule's full parameters
    beyond its own partitions, and partitioned again with rank 0's values.
    """
    import deepspeed

    with torch.no_grad():
        for prefix, submodule in module.named_modules():
            own = dict(submodule.named_parameters(prefix=prefix, recurse=False))
            own.update(submodule.named_buffers(prefix=prefix, recurse=False))
            wanted = {name: tensor for name, tensor in own.items() if plain_name(name) in names}
            if not wanted:
                continue
            partitioned = [tensor for tensor in wanted.values() if hasattr(tensor, "ds_id")]
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
                for name, tensor in wanted.items():
                    value = weights.get(plain_name(name))
                    if value is not None:
                        tensor.copy_(value)
            if torch.distributed.is_initialized():  # buffers, and parameters not partitioned yet: rank 0's
                for tensor in wanted.values():
                    if not hasattr(tensor, "ds_id"):
                        torch.distributed.broadcast(tensor, src=0)


def load_for_evaluation(
    module: torch.nn.Module, checkpoint_path: str | os.PathLike[str], is_global_zero: bool, broadcast: Any
) -> dict[str, Any]:
    """Load the weights of the ZeRO-3 checkpoint directory ``checkpoint_path`` into ``module`` on every rank, and
    return the rest of the checkpoint (Lightning's part) for Lightning to restore.

    Rank 0 consolidates the weights from every rank's shards (DeepSpeed's own ``zero_to_fp32``); a checkpoint that
    lacks some of the model's weights is refused on every rank before anything is copied.
    """
    names = {plain_name(name) for name in worker_only_weights.named_tensors(module)}
    parameters = {plain_name(name) for name, _ in module.named_parameters()}
    weights = consolidated_state_dict(checkpoint_path) if is_global_zero else {}
    missing = broadcast(sorted(name for name in parameters if name not in weights))
    if missing:
        raise KeyError(
            f"the DeepSpeed checkpoint {checkpoint_path} lacks {len(missing)} of the model's weights "
            f"({', '.join(missing[:6])}): is it this model's checkpoint?"
        )
    copy_into_partitions(module, weights, names)
    return _lightning_part(Path(checkpoint_path))


def _lightning_part(directory: Path) -> dict[str, Any]:
    # Every rank's module file holds the same client state; any rank's serves on any world size.
    module_file = sorted((directory / CHECKPOINT_TAG).glob("*model_states.pt"))[0]
    saved = torch.load(module_file, map_location="cpu", weights_only=False)
    return {key: value for key, value in saved.items() if key not in ENGINE_KEYS}
