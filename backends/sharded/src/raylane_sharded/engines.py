"""The sharding engines this backend can run, registered by import path so that choosing one imports nothing.

An engine decides how optimizer state (and, for some, gradients) is split across the workers. Each entry names the
module it needs, the command that installs it, and the backend options it understands; :func:`resolve_engine` checks
all three on the driver, before any actor starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from raylane import BackendLoadError, ConfigurationError

if TYPE_CHECKING:
    from torch.nn import Module
    from torch.optim import Optimizer

DEFAULT_ENGINE = "fairscale"


class ShardingEngine(Protocol):
    """What the strategy asks of an engine. Built inside each worker, from the backend options, on first use."""

    wraps_module_itself: bool
    """True when the engine wraps the module (with the sharded optimizers); False when the strategy's DDP does."""

    def shard_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """A sharded optimizer that replaces ``optimizer`` (same class, hyperparameters and parameter groups)."""

    def wrap_module(self, module: Module, optimizers: list[Optimizer]) -> Module:
        """The module wrapped for sharded gradient reduction (only called when ``wraps_module_itself``)."""

    def no_sync(self, module: Module) -> AbstractContextManager[Any] | None:
        """A context that skips gradient reduction on ``module`` (for gradient accumulation); None if not ours."""

    def unwrap(self, module: Module) -> Module | None:
        """The module inside ``module`` if this engine wrapped it, else None."""

    def clip_grad_norm(self, optimizer: Optimizer, max_norm: float) -> bool:
        """Clip by the global norm when a rank holds only its shard of the gradients; False leaves it to Lightning."""


@dataclass(frozen=True)
class EngineSpec:
    """One engine: where it lives, what it needs installed, and which backend options it takes."""

    name: str
    target: str  # "module:Class", imported only when the engine is built
    requires: str  # top-level module the engine imports
    install_hint: str
    options: tuple[str, ...]  # backend options the engine takes
    ddp_options: tuple[str, ...]  # those of them that go to torch's DistributedDataParallel
    summary: str

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.requires) is not None
        except (ImportError, ValueError):  # a parent package that fails to import, or a module blocked in sys.modules
            return False

    def check_available(self) -> None:
        if not self.available():
            raise BackendLoadError(
                f"The sharded backend's engine {self.name!r} needs the {self.requires!r} package, which is not "
                f"installed in this Python environment ({sys.executable}). Install it with `{self.install_hint}`, "
                f"or choose another engine: {', '.join(f'engine={name!r}' for name in ENGINES if name != self.name)}."
            )

    def build(self, options: Mapping[str, Any]) -> ShardingEngine:
        self.check_available()
        module_name, class_name = self.target.split(":")
        engine_class = getattr(importlib.import_module(module_name), class_name)
        return engine_class(**{name: value for name, value in options.items() if name in self.options})  # type: ignore[no-any-return]

    def ddp_kwargs(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in options.items() if name in self.ddp_options}


ENGINES: Mapping[str, EngineSpec] = {
    "fairscale": EngineSpec(
        name="fairscale",
        target="raylane_sharded.fairscale_engine:FairScaleEngine",
        requires="fairscale",
        install_hint="pip install fairscale==0.4.13",
        options=("reduce_buffer_size", "broadcast_buffers", "auto_refresh_trainable", "broadcast_fp16"),
        ddp_options=(),
        summary="FairScale OSS (optimizer state) + ShardedDataParallel (gradients): ZeRO-1 and ZeRO-2",
    ),
    "zero": EngineSpec(
        name="zero",
        target="raylane_sharded.zero_engine:ZeroEngine",
        requires="torch",
        install_hint="pip install torch",
        options=("broadcast_buffers", "find_unused_parameters", "parameters_as_bucket_view"),
        ddp_options=("broadcast_buffers", "find_unused_parameters"),
        summary="torch ZeroRedundancyOptimizer (optimizer state) + DistributedDataParallel: ZeRO-1",
    ),
}

ENGINE_OPTIONS: Mapping[str, str] = {
    "engine": f"which sharding engine: {', '.join(ENGINES)} (default {DEFAULT_ENGINE!r})",
    "reduce_buffer_size": "fairscale: bytes of the gradient-reduce buckets per device; 0 (default) reduces each "
    "gradient straight to its owner and frees it on the other ranks",
    "broadcast_buffers": "fairscale, zero: broadcast module buffers (e.g. BatchNorm statistics) from rank 0 every "
    "forward (default True)",
    "auto_refresh_trainable": "fairscale: re-shard automatically when parameters are frozen or unfrozen (default True)",
    "broadcast_fp16": "fairscale: send updated parameter shards in fp16 (less traffic, slightly less precise)",
    "find_unused_parameters": "zero: DDP allows parameters that get no gradient in a step",
    "parameters_as_bucket_view": "zero: pack parameters into contiguous buckets for faster broadcasts",
}


def resolve_engine(options: Mapping[str, Any]) -> EngineSpec:
    """The engine ``options["engine"]`` names, after checking it exists, is installed and accepts the other options."""
    name = options.get("engine", DEFAULT_ENGINE)
    spec = ENGINES.get(name) if isinstance(name, str) else None
    if spec is None:
        valid = ", ".join(f"{key!r} ({value.summary})" for key, value in ENGINES.items())
        raise ConfigurationError(f"Unknown engine {name!r} for the sharded backend. Valid engines are: {valid}.")
    foreign = sorted(set(options) - {"engine"} - set(spec.options))
    if foreign:
        owners = {
            option: " / ".join(repr(e.name) for e in ENGINES.values() if option in e.options) for option in foreign
        }
        detail = "; ".join(f"{option} is for engine {owners[option]}" for option in foreign)
        raise ConfigurationError(
            f"Engine {spec.name!r} does not take {', '.join(foreign)} ({detail}). "
            f"Options of engine {spec.name!r}: {', '.join(spec.options)}."
        )
    spec.check_available()
    return spec
