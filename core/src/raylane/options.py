"""The options every backend shares, validated once, before anything touches Ray."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from raylane.errors import ConfigurationError

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Ray's own resource names; users give these through the dedicated options, not resources_per_worker.
_RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class LaunchOptions:
    """How many Ray actors to start, with what resources, and how to prepare them.

    Built by :func:`raylane.get_strategy` from its keyword arguments; backends read it, never build it.
    """

    workers: int
    """How many workers a run uses. ``workers=(min, max)`` (or ``min_workers=min`` with ``workers=max``, the form for
    configuration files) makes the run elastic: this is then the most workers, and ``min_workers`` the fewest."""
    cpus_per_worker: float = 1
    use_gpu: bool = False
    gpus_per_worker: float | None = None
    resources_per_worker: Mapping[str, float] = field(default_factory=dict)
    placement_strategy: str = "PACK"
    init_hook: Callable[[], Any] | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # credentials: never in a repr
    runtime_env: Mapping[str, Any] | None = None
    resource_timeout: float = 300.0
    collective_timeout: float = 1800.0
    heartbeat_timeout: float = 30.0
    max_failures: int = 0
    idle_timeout: float = 30.0
    reuse_workers: bool = True
    min_workers: int | None = None  # None: the same as workers (a fixed count); see :mod:`raylane.elastic`
    grow_after_s: float = 60.0  # an elastic run grows once capacity for more workers has been free this long

    def __post_init__(self) -> None:
        most, fewest = worker_range(self.workers, self.min_workers)
        object.__setattr__(self, "workers", most)  # frozen: normalised once, here
        object.__setattr__(self, "min_workers", fewest)
        _check_amount("cpus_per_worker", self.cpus_per_worker)
        if not isinstance(self.use_gpu, bool):
            raise ConfigurationError(f"use_gpu must be True or False, got {self.use_gpu!r}.")
        if self.gpus_per_worker is not None:
            _check_amount("gpus_per_worker", self.gpus_per_worker)
            if self.gpus_per_worker == 0 and self.use_gpu:
                raise ConfigurationError(
                    "use_gpu=True with gpus_per_worker=0 reserves no GPU; give gpus_per_worker > 0 or use_gpu=False."
                )
            if self.gpus_per_worker > 0 and not self.use_gpu:
                raise ConfigurationError(
                    f"gpus_per_worker={self.gpus_per_worker} needs use_gpu=True; pass use_gpu=True or drop "
                    "gpus_per_worker."
                )
            if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
                raise ConfigurationError(
                    f"gpus_per_worker={self.gpus_per_worker}: Ray allows fractions only below 1 GPU; "
                    "use a whole number above 1."
                )
        for name, amount in dict(self.resources_per_worker).items():
            if name in _RESERVED_RESOURCES:
                raise ConfigurationError(
                    f"resources_per_worker must not name {name!r}; use cpus_per_worker / use_gpu / gpus_per_worker."
                )
            _check_amount(f"resources_per_worker[{name!r}]", amount)
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigurationError(
                f"placement_strategy={self.placement_strategy!r} is not one of {', '.join(PLACEMENT_STRATEGIES)}."
            )
        if self.init_hook is not None and not callable(self.init_hook):
            raise ConfigurationError(f"init_hook must be a callable taking no arguments, got {self.init_hook!r}.")
        for key, value in dict(self.env).items():
            if not isinstance(key, str) or not isinstance(value, str):
                # The value's type only: env carries credentials, which no message may show.
                raise ConfigurationError(f"env must map str to str; got {key!r}: a {type(value).__name__}.")
        if self.runtime_env is not None and not isinstance(self.runtime_env, Mapping):
            raise ConfigurationError(f"runtime_env must be a dict as Ray accepts it, got {self.runtime_env!r}.")
        _check_amount("resource_timeout", self.resource_timeout, allow_zero=False)
        _check_amount("collective_timeout", self.collective_timeout, allow_zero=False)
        _check_amount("heartbeat_timeout", self.heartbeat_timeout, allow_zero=False)
        _check_amount("idle_timeout", self.idle_timeout)
        _check_amount("grow_after_s", self.grow_after_s)
        if not isinstance(self.reuse_workers, bool):
            raise ConfigurationError(f"reuse_workers must be True or False, got {self.reuse_workers!r}.")
        if not self.worker_resources():
            raise ConfigurationError(
                "cpus_per_worker=0 with no GPU or custom resources reserves nothing, which Ray cannot place; "
                "give cpus_per_worker > 0."
            )
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ConfigurationError(f"max_failures must be a whole number >= 0, got {self.max_failures!r}.")

    @property
    def gpus(self) -> float:
        """GPUs each worker reserves: `gpus_per_worker`, or one when only `use_gpu` is given."""
        if not self.use_gpu:
            return 0.0
        return 1.0 if self.gpus_per_worker is None else float(self.gpus_per_worker)

    @property
    def elastic(self) -> bool:
        """Whether the worker count is a range (``workers=(min, max)`` with min < max)."""
        return self.min_workers is not None and self.min_workers < self.workers

    def sized(self, workers: int) -> LaunchOptions:
        """These options for one run of exactly ``workers`` workers (an elastic run's current size)."""
        return replace(self, workers=workers, min_workers=workers)

    def same_workers(self, other: LaunchOptions) -> bool:
        """Whether actors started for ``other`` are what these options would start: the same count, resources,
        placement and runtime environment. Everything else (timeouts, ``env``, ``init_hook``) applies per entry point,
        so idle workers of one Trainer can serve another (unless either opts out with ``reuse_workers=False``)."""
        return (
            self.reuse_workers
            and other.reuse_workers
            and self.workers == other.workers
            and self.worker_resources() == other.worker_resources()
            and self.placement_strategy == other.placement_strategy
            and self.runtime_env == other.runtime_env
        )

    def worker_resources(self) -> dict[str, float]:
        """One worker's reservation, in Ray's resource names (the shape of a placement-group bundle)."""
        bundle = {"CPU": float(self.cpus_per_worker), **{k: float(v) for k, v in self.resources_per_worker.items()}}
        if self.gpus:
            bundle["GPU"] = self.gpus
        return {name: amount for name, amount in bundle.items() if amount > 0}


LAUNCH_OPTION_NAMES = tuple(f.name for f in fields(LaunchOptions))


def split_options(
    options: Mapping[str, Any], backend_known: Mapping[str, Any], backend: str
) -> tuple[LaunchOptions, dict[str, Any]]:
    """Separate the shared launch options from the backend's own (only those given), rejecting names neither knows."""
    unknown = sorted(set(options) - set(LAUNCH_OPTION_NAMES) - set(backend_known))
    if unknown:
        valid = ", ".join(sorted(set(LAUNCH_OPTION_NAMES) | set(backend_known)))
        raise ConfigurationError(
            f"Unknown option(s) for backend {backend!r}: {', '.join(unknown)}. Valid options are: {valid}."
        )
    if "workers" not in options:
        raise ConfigurationError(f"get_strategy({backend!r}, ...) needs workers=N, the number of Ray worker processes.")
    launch = LaunchOptions(**{k: v for k, v in options.items() if k in LAUNCH_OPTION_NAMES})
    backend_options = {k: v for k, v in options.items() if k in backend_known}
    return launch, backend_options


def worker_range(workers: object, min_workers: object = None) -> tuple[int, int]:
    """``(most, fewest)`` workers from ``workers=N``, ``workers=(min, max)`` or ``workers=max, min_workers=min``."""
    if isinstance(workers, (tuple, list)):
        if len(workers) != 2:
            raise ConfigurationError(
                f"workers={workers!r}: a range is two whole numbers, workers=(min, max) such as workers=(2, 8); "
                "for a fixed count write workers=N."
            )
        if min_workers is not None:
            raise ConfigurationError(
                f"workers={workers!r} with min_workers={min_workers!r} gives the fewest workers twice; write "
                "workers=(min, max), or workers=max with min_workers=min."
            )
        fewest, most = workers
        _check_workers(fewest, f"workers=(min, max) needs a whole number (int) >= 1 as min, got {fewest!r}")
        _check_workers(most, f"workers=(min, max) needs a whole number (int) >= 1 as max, got {most!r}")
        if fewest > most:
            raise ConfigurationError(
                f"workers={workers!r}: min is above max; write the smaller first, workers=({most}, {fewest})."
            )
        return most, fewest
    if isinstance(workers, int) and not isinstance(workers, bool) and workers < 1:
        raise ConfigurationError(f"workers must be at least 1, got {workers}.")
    _check_workers(workers, f"workers must be a whole number (int) of at least 1, or (min, max); got {workers!r}")
    assert isinstance(workers, int)
    if min_workers is None:
        return workers, workers
    _check_workers(min_workers, f"min_workers must be a whole number (int) of at least 1, got {min_workers!r}")
    assert isinstance(min_workers, int)
    if min_workers > workers:
        raise ConfigurationError(
            f"min_workers={min_workers} is above workers={workers}, the most workers; give min_workers <= workers."
        )
    return workers, min_workers


def _check_workers(workers: object, message: str) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigurationError(f"{message}.")


def _check_amount(name: str, value: object, *, allow_zero: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "above 0"
        raise ConfigurationError(f"{name} must be {bound}, got {value}.")
