"""ray_lightning's ``get_tune_resources(num_workers, num_cpus_per_worker, use_gpu)``, for scripts written for it.

Same bundles as ray_lightning: one CPU for the trial's own process, then per worker ``num_cpus_per_worker`` CPUs and
one GPU with ``use_gpu``, packed. Pass ``driver_resources={}`` to let the trial's process reserve nothing, as
raylane's own form does by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from raylane.errors import ConfigurationError
from raylane.options import LaunchOptions
from raylane_tune.resources import trial_resources

if TYPE_CHECKING:
    from ray.tune import PlacementGroupFactory

RAY_LIGHTNING_DRIVER_RESOURCES: Mapping[str, float] = {"CPU": 1}
"""ray_lightning reserved one CPU for the trial's own process (its "head bundle")."""


def ray_lightning_tune_resources(
    num_workers: int = 1,
    num_cpus_per_worker: float = 1,
    use_gpu: bool = False,
    *,
    cpus_per_worker: float | None = None,
    driver_resources: Mapping[str, float] | None = None,
    **unknown: Any,
) -> PlacementGroupFactory:
    """A trial of ``num_workers`` workers as ray_lightning sized it; ``cpus_per_worker`` is its older CPU name."""
    if unknown:
        raise ConfigurationError(
            f"get_tune_resources({', '.join(sorted(unknown))}=...): ray_lightning's form takes num_workers, "
            "num_cpus_per_worker, use_gpu and driver_resources; for raylane's options name a backend first, e.g. "
            "get_tune_resources('ddp', workers=2, ...)."
        )
    if cpus_per_worker is not None:
        if num_cpus_per_worker not in (1, cpus_per_worker):
            raise ConfigurationError(
                f"get_tune_resources(num_cpus_per_worker={num_cpus_per_worker}, cpus_per_worker={cpus_per_worker}): "
                "both name the CPUs of each worker; give one."
            )
        num_cpus_per_worker = cpus_per_worker
    options = LaunchOptions(workers=num_workers, cpus_per_worker=num_cpus_per_worker, use_gpu=use_gpu)
    bundles = [options.worker_resources() for _ in range(options.workers)]
    driver = RAY_LIGHTNING_DRIVER_RESOURCES if driver_resources is None else driver_resources
    return trial_resources(bundles, options, driver)
