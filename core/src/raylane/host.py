"""The plugin host: one pluggy manager per backend, behind a typed facade.

Each run gets a host holding exactly three kinds of plugin: the core's defaults, the selected backend, and the
extension plugins (entry-point group ``raylane.plugins``, e.g. the Tune bridge). Other installed backends are never
loaded, so their hooks cannot answer for the selected one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from raylane import builtin, hookspecs
from raylane.errors import BackendLoadError

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from raylane.context import WorkerContext
    from raylane.options import LaunchOptions
    from raylane.placement import WorkerReservation
    from raylane.topology import DeviceAssignment, WorkerPlacement


class BackendHost:
    """Calls the hooks of one backend; the rest of raylane never touches pluggy directly."""

    def __init__(self, backend: str, plugin: object, extensions: Sequence[tuple[str, object]] = ()) -> None:
        self.backend = backend
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._register("raylane.builtin", builtin)
        for name, extension in extensions:
            self._register(name, extension)
        self._register(f"backend:{backend}", plugin)

    def _register(self, name: str, plugin: object) -> None:
        try:
            self._pm.register(plugin, name=name)
            self._pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as err:
            raise BackendLoadError(f"Plugin {name!r} does not match raylane's hook specifications: {err}") from err

    @property
    def plugin_names(self) -> list[str]:
        return [name for name, _ in self._pm.list_name_plugin()]

    def strategy_class(self, lightning: ModuleType | None = None) -> type[pl.strategies.Strategy]:
        strategy_class = self._pm.hook.raylane_strategy_class(lightning=lightning)
        if strategy_class is None:
            raise BackendLoadError(
                f"Backend {self.backend!r} implements no raylane_strategy_class hook; a backend must return its "
                "Lightning Strategy class from it."
            )
        return strategy_class  # type: ignore[no-any-return]

    def backend_options(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for options in reversed(self._pm.hook.raylane_backend_options()):
            merged.update(options)
        return merged

    def placement_bundles(self, options: LaunchOptions) -> list[dict[str, float]]:
        return list(self._pm.hook.raylane_placement_bundles(options=options))

    def resumes_on_any_world_size(self, options: LaunchOptions, backend_options: Mapping[str, Any]) -> bool:
        return bool(self._pm.hook.raylane_resumes_on_any_world_size(options=options, backend_options=backend_options))

    def workers_that_fit(self, options: LaunchOptions) -> int | None:
        return self._pm.hook.raylane_workers_that_fit(options=options)  # type: ignore[no-any-return]

    def reserve_workers(self, bundles: list[dict[str, float]], options: LaunchOptions, name: str) -> WorkerReservation:
        return self._pm.hook.raylane_reserve_workers(bundles=bundles, options=options, name=name)  # type: ignore[no-any-return]

    def worker_actor_options(self, options: LaunchOptions, bundle_index: int) -> dict[str, Any]:
        return _merge(self._pm.hook.raylane_worker_actor_options(options=options, bundle_index=bundle_index))

    def assign_devices(self, placements: Sequence[WorkerPlacement], options: LaunchOptions) -> list[DeviceAssignment]:
        return list(self._pm.hook.raylane_assign_devices(placements=placements, options=options))

    def worker_env(self, context: WorkerContext) -> dict[str, str]:
        return _merge(self._pm.hook.raylane_worker_env(context=context))

    def setup_process_group(self, context: WorkerContext) -> None:
        self._pm.hook.raylane_setup_process_group(context=context)

    def teardown_process_group(self, context: WorkerContext) -> None:
        self._pm.hook.raylane_teardown_process_group(context=context)

    def collect_results(self, trainer: pl.Trainer, context: WorkerContext) -> dict[str, Any]:
        return _merge(self._pm.hook.raylane_collect_results(trainer=trainer, context=context))

    def apply_results(self, trainer: pl.Trainer, results: Mapping[str, Any]) -> None:
        self._pm.hook.raylane_apply_results(trainer=trainer, results=results)

    def relay_metrics(self, trainer: pl.Trainer, topic: str, payload: Any) -> None:
        self._pm.hook.raylane_relay_metrics(trainer=trainer, topic=topic, payload=payload)


def _merge(contributions: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    # pluggy returns the last-registered plugin's result first; merge oldest first so the backend's values win.
    merged: dict[str, Any] = {}
    for contribution in reversed(contributions):
        if contribution:
            merged.update(contribution)
    return merged
