"""A worker process's own defaults, put back before every entry point.

Warm workers run entry points of one Trainer after another, and of later Trainers of the same driver. Whatever one
entry point's code changed in the process (environment variables, torch's thread count, default dtype, matmul
precision, grad mode) must not reach the next one, which should see the process as a fresh worker would. What the
driver decides (seeds, deterministic algorithms) comes on top, with the payload
(:class:`raylane.payload.GlobalTorchState`).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProcessDefaults:
    """What a fresh worker process starts with, captured when the actor starts."""

    environ: dict[str, str]
    num_threads: int
    default_dtype: torch.dtype
    float32_matmul_precision: str
    grad_enabled: bool

    @classmethod
    def capture(cls) -> ProcessDefaults:
        return cls(
            environ=dict(os.environ),
            num_threads=torch.get_num_threads(),
            default_dtype=torch.get_default_dtype(),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            grad_enabled=torch.is_grad_enabled(),
        )

    def restore(self, after_an_entry_point: bool = True) -> None:
        """Put the defaults back, and free what the previous entry point left (its model is garbage by now). Before
        a process's first entry point there is nothing to free, and a full collection costs 0.17 s with torch and
        Lightning imported, ahead of the first step."""
        os.environ.clear()
        os.environ.update(self.environ)
        torch.set_num_threads(self.num_threads)
        torch.set_default_dtype(self.default_dtype)
        torch.set_float32_matmul_precision(self.float32_matmul_precision)
        torch.set_grad_enabled(self.grad_enabled)
        if not after_an_entry_point:
            return
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the cached blocks of the previous entry point's tensors go back to the device
