"""The user-facing entry point: a Lightning strategy for a named backend."""

from __future__ import annotations

import functools
from typing import Any

from pytorch_lightning.strategies import Strategy, StrategyRegistry

from raylane.errors import BackendConflictError
from raylane.registry import backend_host, discover

LIGHTNING_PREFIX = "ray_"
REGISTRY_DEFAULT_WORKERS = 2


def get_strategy(name: str, **options: Any) -> Strategy:
    """A Lightning strategy that runs the Trainer's entry points on ``workers`` Ray actors with backend ``name``.

    Shared options (see :class:`raylane.options.LaunchOptions`): ``workers`` (required), ``cpus_per_worker``,
    ``use_gpu``, ``gpus_per_worker``, ``resources_per_worker``, ``placement_strategy``, ``init_hook``, ``env``,
    ``runtime_env``, ``resource_timeout``, ``collective_timeout``. Anything else must be one of the backend's own
    options; an unknown name fails with the list of valid ones, before any actor starts.
    """
    strategy_class = backend_host(name).strategy_class()
    return strategy_class(**options)


def register_with_lightning() -> list[str]:
    """Make ``Trainer(strategy="ray_<backend>")`` work for every installed backend, without importing any of them.

    The string form uses ``workers=2``; pass a strategy object from :func:`get_strategy` for anything else.
    """
    names = []
    try:
        installed = discover()
    except BackendConflictError:
        return names  # reported where the backends are used (get_strategy, list_backends, `raylane backends`)
    for backend in installed:
        name = f"{LIGHTNING_PREFIX}{backend}"
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name,
                functools.partial(get_strategy, backend),
                description=f"raylane {backend} backend on Ray workers",
                workers=REGISTRY_DEFAULT_WORKERS,
            )
        names.append(name)
    return names
