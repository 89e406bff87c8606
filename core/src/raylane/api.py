"""The user-facing entry point: a Lightning strategy for a named backend, in the user's Lightning namespace."""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from raylane import _lightning
from raylane.errors import BackendConflictError, BackendLoadError
from raylane.registry import backend_host, discover
from raylane.strategy import RayStrategyMixin

if TYPE_CHECKING:
    from pytorch_lightning.strategies import Strategy

LIGHTNING_PREFIX = "ray_"
REGISTRY_DEFAULT_WORKERS = 2


def get_strategy(name: str, *, lightning: ModuleType | str | None = None, **options: Any) -> Strategy:
    """A Lightning strategy that runs the Trainer's entry points on ``workers`` Ray actors with backend ``name``.

    Shared options (see :class:`raylane.options.LaunchOptions`): ``workers`` (required; a count, or ``(min, max)`` for
    an elastic run, see :mod:`raylane.elastic`), ``cpus_per_worker``, ``use_gpu``, ``gpus_per_worker``,
    ``resources_per_worker``, ``placement_strategy``, ``init_hook``, ``env``, ``runtime_env``, ``resource_timeout``,
    ``collective_timeout``, ``heartbeat_timeout``, ``max_failures``, ``idle_timeout``, ``reuse_workers``,
    ``min_workers``, ``grow_after_s``. Anything else must be one of the backend's own options; an unknown name fails
    with the list of valid ones, before any actor starts.

    ``lightning`` says which Lightning the Trainer comes from (``"pytorch_lightning"`` or ``"lightning.pytorch"``, or
    the module); by default, the one this process imported.
    """
    return strategy_class(name, lightning)(**options)


def release_idle_workers() -> None:
    """Stop every idle warm worker this driver keeps, now: those of its Trainers, and those Trainers it dropped left
    for its next one. They leave by themselves after ``idle_timeout``, and at once when other work waits for what they
    hold; this is for a driver that wants their memory back, or fresh workers for its next Trainer."""
    launcher = sys.modules.get("raylane.launcher")  # not imported: no Trainer of this process ever ran
    if launcher is not None:
        launcher.release_idle_workers("raylane.release_idle_workers()")


def strategy_class(name: str, lightning: ModuleType | str | None = None) -> type[Strategy]:
    """Backend ``name``'s Lightning strategy class for namespace ``lightning`` (default: the one imported)."""
    module = _lightning.namespace(lightning)
    provided = backend_host(name).strategy_class(module)
    if isinstance(provided, type) and issubclass(provided, RayStrategyMixin) and provided.lightning is None:
        provided = provided.for_lightning(module)  # a namespace-free class returned as is
    if not (isinstance(provided, type) and issubclass(provided, module.strategies.Strategy)):
        raise BackendLoadError(
            f"Backend {name!r} has no strategy for {module.__name__} Trainers: its raylane_strategy_class hook "
            f"returned {provided!r}. The backend needs a release whose hook takes `lightning` and returns "
            "`MyStrategy.for_lightning(lightning)` (see raylane.strategy)."
        )
    return provided


def register_with_lightning(lightning: ModuleType | str | None = None) -> list[str]:
    """Make ``Trainer(strategy="ray_<backend>")`` work for every installed backend, without importing any of them.

    Registers in ``lightning``'s StrategyRegistry, or by default in that of every Lightning namespace imported so far
    (``import raylane`` does this). The string form uses ``workers=2``; pass a strategy object from
    :func:`get_strategy` for anything else.
    """
    names: list[str] = []
    try:
        installed = discover()
    except BackendConflictError:
        return names  # reported where the backends are used (get_strategy, list_backends, `raylane backends`)
    namespaces = [_lightning.namespace(lightning)] if lightning is not None else _imported_namespace_modules()
    for module in namespaces:
        registry = module.strategies.StrategyRegistry
        for backend in installed:
            name = f"{LIGHTNING_PREFIX}{backend}"
            if name not in registry:
                registry.register(
                    name,
                    functools.partial(get_strategy, backend, lightning=module.__name__),
                    description=f"raylane {backend} backend on Ray workers",
                    workers=REGISTRY_DEFAULT_WORKERS,
                )
            if name not in names:
                names.append(name)
    return names


def _imported_namespace_modules() -> list[ModuleType]:
    return [_lightning.namespace(name) for name in _lightning.imported_namespaces()]
