"""Sizing a Tune trial: one placement group holding the trial's own process and every raylane worker it starts.

Tune reserves the whole group before it starts the trial, so a trial never starts unless all its workers can be
placed, and trials that do not fit wait in Tune's queue instead of deadlocking inside ``trainer.fit()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from raylane.errors import ConfigurationError
from raylane.options import LaunchOptions, split_options
from raylane.registry import backend_host

if TYPE_CHECKING:
    from pytorch_lightning.strategies import Strategy
    from ray.tune import PlacementGroupFactory

DRIVER_RESOURCES_DEFAULT: Mapping[str, float] = {}
"""The trial's own process reserves nothing by default: it only waits for its workers and relays their reports."""


def get_tune_resources(
    backend_or_strategy: str | Strategy | int | None = None,
    *ray_lightning_args: Any,
    driver_resources: Mapping[str, float] | None = None,
    reserve_workers: int | None = None,
    **options: Any,
) -> PlacementGroupFactory:
    """The resources of one Tune trial that trains with raylane, for ``tune.with_resources`` or ``resources_per_trial``.

    ``backend_or_strategy`` is a backend name followed by the same options as :func:`raylane.get_strategy`
    (``workers`` required), or a strategy that :func:`raylane.get_strategy` returned (then no options: its own are
    used). The backend decides the workers' bundles (hook ``raylane_placement_bundles``); they follow the trial's
    first bundle, ``driver_resources`` (Ray resource names, e.g. ``{"CPU": 1}``; default nothing), and are placed
    with the strategy's ``placement_strategy``.

    An elastic strategy (``workers=(min, max)``) gets bundles for ``max`` workers, so its trial runs on ``max`` from the
    start; inside a trial the run never grows past the bundles the trial holds, since Tune sized it. To reserve fewer,
    pass ``reserve_workers`` (between ``min`` and ``max``): the trial then runs on that many.

    ray_lightning's form, ``get_tune_resources(num_workers, num_cpus_per_worker=1, use_gpu=False)`` (positional or
    by name), keeps its meaning: see :func:`raylane_tune.legacy.ray_lightning_tune_resources`.
    """
    if backend_or_strategy is None or (
        isinstance(backend_or_strategy, int) and not isinstance(backend_or_strategy, bool)
    ):
        from raylane_tune.legacy import ray_lightning_tune_resources

        leading = () if backend_or_strategy is None else (backend_or_strategy,)
        return ray_lightning_tune_resources(*leading, *ray_lightning_args, driver_resources=driver_resources, **options)
    if ray_lightning_args:
        raise ConfigurationError(
            f"get_tune_resources({backend_or_strategy!r}, ...): after a backend or strategy, options go by name, "
            "e.g. get_tune_resources('ddp', workers=2, cpus_per_worker=1)."
        )
    if isinstance(backend_or_strategy, str):
        backend = backend_or_strategy
        host = backend_host(backend)
        launch_options, _ = split_options(options, host.backend_options(), backend)
    else:
        backend, launch_options = _strategy_settings(backend_or_strategy)
        if options:
            raise ConfigurationError(
                f"get_tune_resources(strategy, {', '.join(sorted(options))}=...): a strategy brings its own options. "
                "Pass them to get_strategy, or pass the backend name here instead of the strategy."
            )
        host = backend_host(backend)
    if reserve_workers is not None:
        launch_options = launch_options.sized(_reserved(reserve_workers, launch_options))
    return trial_resources(host.placement_bundles(launch_options), launch_options, driver_resources)


def _reserved(count: object, options: LaunchOptions) -> int:
    """``reserve_workers``, checked against the strategy's worker range."""
    fewest = options.min_workers if options.min_workers is not None else options.workers
    if isinstance(count, bool) or not isinstance(count, int) or not fewest <= count <= options.workers:
        raise ConfigurationError(
            f"reserve_workers={count!r}: give a whole number from the strategy's fewest to its most workers, "
            f"{fewest} to {options.workers} (workers=({fewest}, {options.workers}))."
        )
    return count


def trial_resources(
    worker_bundles: list[dict[str, float]],
    options: LaunchOptions,
    driver_resources: Mapping[str, float] | None = None,
) -> PlacementGroupFactory:
    """The trial's placement group: the driver's bundle first, then one bundle per worker in rank order."""
    from ray.tune import PlacementGroupFactory

    driver = _check_driver_resources(DRIVER_RESOURCES_DEFAULT if driver_resources is None else driver_resources)
    return PlacementGroupFactory([driver, *worker_bundles], strategy=options.placement_strategy)


def _strategy_settings(strategy: object) -> tuple[str, LaunchOptions]:
    backend = getattr(strategy, "backend_name", None)
    options = getattr(strategy, "launch_options", None)
    if not isinstance(backend, str) or not isinstance(options, LaunchOptions):
        raise ConfigurationError(
            f"get_tune_resources needs a backend name (e.g. 'ddp') or a strategy from raylane.get_strategy, "
            f"got {strategy!r}."
        )
    return backend, options


def _check_driver_resources(resources: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(resources, Mapping):
        raise ConfigurationError(f"driver_resources must map Ray resource names to amounts, got {resources!r}.")
    checked = {}
    for name, amount in resources.items():
        if (
            not isinstance(name, str)
            or isinstance(amount, bool)
            or not isinstance(amount, (int, float))
            or not math.isfinite(amount)
            or amount < 0
        ):
            raise ConfigurationError(
                f"driver_resources must map Ray resource names to amounts of at least 0, got {name!r}: {amount!r}."
            )
        if name.upper() in ("CPU", "GPU") and name != name.upper():
            raise ConfigurationError(f"driver_resources: Ray spells it {name.upper()!r}, not {name!r}.")
        checked[name] = float(amount)
    return checked
