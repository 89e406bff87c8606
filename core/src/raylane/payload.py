"""What travels from the driver to the workers: the Trainer's entry point, its arguments and global torch state.

It goes through Ray's object store once and every worker reads the same copy. When it cannot be pickled, the error
names the attribute that cannot, instead of Ray's generic serialization traceback.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch
from ray import cloudpickle

from raylane import _lightning
from raylane.errors import SerializationError

if TYPE_CHECKING:
    import pytorch_lightning as pl


@dataclass(frozen=True)
class GlobalTorchState:
    """Process-global settings a fresh worker would otherwise lose (Lightning's spawn launcher carries the same)."""

    deterministic: bool
    deterministic_warn_only: bool
    cudnn_benchmark: bool
    torch_rng: torch.Tensor
    numpy_rng: Any
    python_rng: Any

    @classmethod
    def capture(cls) -> GlobalTorchState:
        return cls(
            deterministic=torch.are_deterministic_algorithms_enabled(),
            deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            torch_rng=torch.get_rng_state(),
            numpy_rng=np.random.get_state(),
            python_rng=random.getstate(),
        )

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.set_rng_state(self.torch_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)


@dataclass(frozen=True)
class LaunchPayload:
    """One Lightning entry point, ready to run in a worker."""

    trainer: pl.Trainer
    function: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    global_state: GlobalTorchState


COMPILED_MODEL = (
    "The model went through torch.compile on the driver, and torch's compiled functions cannot be pickled to send "
    "them to the Ray workers (Lightning's ddp_spawn cannot send them either). Pass the model uncompiled and compile "
    "it on the workers, in the LightningModule's configure_model hook: `def configure_model(self): self.compile()` "
    "(nn.Module.compile compiles in place, so the state_dict keeps its keys and the trained weights come back to this "
    "model); compile a submodule the same way, with self.<submodule>.compile()."
)


def put_payload(payload: LaunchPayload) -> ray.ObjectRef:
    """Store the payload once in Ray's object store, or explain which part cannot be pickled."""
    if _lightning.compiled_by_torch_compile(payload.trainer.lightning_module):
        raise SerializationError(COMPILED_MODEL)
    try:
        return ray.put(payload)
    except Exception as err:
        culprit = find_unpicklable(payload.trainer.lightning_module, "model") or find_unpicklable(
            (payload.args, payload.kwargs), "the entry point's arguments"
        )
        where = culprit or "the Trainer or one of its callbacks/loggers"
        cause = err.__cause__ or err  # Ray's own error repeats the repr of the whole payload
        raise SerializationError(
            f"raylane must pickle the Trainer and LightningModule to send them to the Ray workers, but {where} "
            f"cannot be pickled ({type(cause).__name__}: {cause}). Create such objects inside the LightningModule's "
            "hooks (setup/configure_model) or exclude them in __getstate__."
        ) from err


def find_unpicklable(obj: object, path: str, depth: int = 4) -> str | None:
    """The dotted path of the innermost attribute of ``obj`` that cannot be pickled, or None if all of it can."""
    if _pickles(obj):
        return None
    if depth > 0:
        for name, value in _children(obj):
            found = find_unpicklable(value, f"{path}.{name}" if name.isidentifier() else f"{path}[{name}]", depth - 1)
            if found is not None:
                return found
    return f"{path} ({type(obj).__module__}.{type(obj).__qualname__})"


def _pickles(obj: object) -> bool:
    try:
        cloudpickle.dumps(obj)
    except Exception:
        return False
    return True


def _children(obj: object) -> list[tuple[str, object]]:
    if isinstance(obj, dict):
        return [(repr(key), value) for key, value in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(str(index), value) for index, value in enumerate(obj)]
    children = dict(getattr(obj, "__dict__", {}))
    # nn.Module keeps submodules, parameters and buffers out of __dict__.
    for container in ("_modules", "_parameters", "_buffers"):
        children.update(children.pop(container, None) or {})
    return [(name, value) for name, value in children.items() if value is not None]
