"""Trained weights from rank 0 to the driver without pickling their bytes.

Ray pickles a torch tensor through ``torch.save`` into a bytes object (one full copy and a serialisation pass on the
worker, another on the driver), but hands numpy arrays to its object store out of band and reads them back without a
copy. So rank 0 sends each tensor as a ``uint8`` array view of its own memory, and the driver views it as a tensor
again: the bytes are copied once, into the object store, as for any ``ray.get``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class TensorBytes:
    """One tensor's memory as bytes, with what it takes to view them as that tensor again."""

    data: np.ndarray  # uint8, contiguous
    dtype: torch.dtype
    shape: tuple[int, ...]

    def to_tensor(self) -> torch.Tensor:
        """A tensor over the received bytes, without copying them. Read-only memory: load it, do not modify it."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            flat = torch.from_numpy(self.data)
        return flat.view(self.dtype).reshape(self.shape)


def pack_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Each dense CPU-able tensor as :class:`TensorBytes`; anything else (sparse, quantized, subclasses) as is."""
    return {name: _pack(value) for name, value in state_dict.items()}


def unpack_state_dict(packed: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value.to_tensor() if isinstance(value, TensorBytes) else value for name, value in packed.items()}


def _pack(value: Any) -> Any:
    if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.layout != torch.strided or value.is_quantized:
        return value
    tensor = value.detach().cpu().contiguous()
    return TensorBytes(tensor.reshape(-1).view(torch.uint8).numpy(), tensor.dtype, tuple(tensor.shape))
