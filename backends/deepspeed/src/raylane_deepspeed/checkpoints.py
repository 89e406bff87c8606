"""Reading what this backend's checkpoints hold, on the driver or anywhere else DeepSpeed is installed.

Lightning's DeepSpeedStrategy saves each checkpoint as a directory (``epoch=1-step=8.ckpt/``) in which every rank
wrote its own shards under the tag ``checkpoint``: optimizer state for every stage, and for ZeRO-3 the weights too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under


def consolidated_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The full fp32 weights in a DeepSpeed checkpoint directory, keyed as the LightningModule's ``state_dict``.

    For a single-file Lightning checkpoint instead (to load in a plain Trainer or ``load_from_checkpoint``), use
    Lightning's ``convert_zero_checkpoint_to_fp32_state_dict(path, output_file)``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = Path(path)
    if not (directory / CHECKPOINT_TAG).is_dir():
        raise FileNotFoundError(f"{directory} is not a DeepSpeed checkpoint directory (no {CHECKPOINT_TAG}/ in it)")
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=CHECKPOINT_TAG))
