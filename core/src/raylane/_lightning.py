"""Every use of Lightning's private API in raylane, and which of Lightning's two namespaces a run uses.

Lightning ships the same classes twice: ``pytorch_lightning`` (with ``lightning_fabric``) and ``lightning.pytorch``
(with ``lightning.fabric``) in the unified ``lightning`` package. A Trainer accepts only strategies of its own copy, so
raylane never imports either at import time: each strategy class is built for one namespace module (see
:mod:`raylane.strategy`), and everything here takes that module.

Lightning has no public way to replace how a strategy starts its processes, so the launcher plugs into the private
``_Launcher`` interface and ``Strategy._configure_launcher``. ``tests/test_lightning_contract.py`` checks each name used
here against every installed namespace, so a release that changes one fails that test by name instead of breaking
users.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from raylane.errors import ConfigurationError

if TYPE_CHECKING:
    import pytorch_lightning as pl

# Each Lightning namespace (the Trainer's package) with its Fabric twin.
FABRIC_OF = {"pytorch_lightning": "lightning_fabric", "lightning.pytorch": "lightning.fabric"}
NAMESPACES = tuple(FABRIC_OF)
ALIASES = {"lightning": "lightning.pytorch", "pl": "pytorch_lightning"}
log = logging.getLogger(__name__)
# TrainerFn's values (a str enum, equal to these in both namespaces).
FITTING = "fit"
PREDICTING = "predict"


def namespace(lightning: ModuleType | str | None = None) -> ModuleType:
    """The Lightning namespace module a strategy is for.

    ``lightning`` names it (``"pytorch_lightning"``, ``"lightning.pytorch"``, or ``"lightning"`` for the latter) or is
    the module itself; ``None`` picks the one this process imported, which must be exactly one.
    """
    if isinstance(lightning, ModuleType):
        if lightning.__name__ in FABRIC_OF:
            return lightning  # also while it is still being imported (see when_imported)
        lightning = lightning.__name__
    if lightning is None:
        return importlib.import_module(imported_namespace())
    name = ALIASES.get(lightning, lightning)
    if name not in FABRIC_OF:
        raise ConfigurationError(
            f"lightning={lightning!r} is not a Lightning namespace; use 'pytorch_lightning' or 'lightning.pytorch'."
        )
    return importlib.import_module(name)


def imported_namespaces() -> list[str]:
    """The Lightning namespaces this process has imported so far."""
    return [name for name in NAMESPACES if name in sys.modules]


def calling_namespace() -> str | None:
    """The Lightning namespace whose code is on the current call stack (the innermost), if any."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        for name in NAMESPACES:
            if module == name or module.startswith(f"{name}."):
                return name
        frame = frame.f_back
    return None


def installed_namespaces() -> list[str]:
    """The Lightning namespaces installed here (found without importing them)."""
    return [name for name in NAMESPACES if importlib.util.find_spec(name.split(".")[0]) is not None]


def imported_namespace() -> str:
    """The namespace this process imported; before any import, the only one installed.

    With both imported, the one whose code builds the strategy decides: LightningCLI, or a Trainer resolving a
    strategy name. (Tools can import the other behind the user's back: LightningCLI's jsonargparse runs the
    ``if TYPE_CHECKING:`` imports of the module a class path names.)
    """
    imported = imported_namespaces()
    if len(imported) == 1:
        return imported[0]
    caller = calling_namespace()
    if caller is not None:
        return caller
    installed = installed_namespaces()
    if not imported and len(installed) == 1:
        return installed[0]
    if imported:
        problem = "both pytorch_lightning and lightning.pytorch are imported in this process"
    else:
        problem = "neither pytorch_lightning nor lightning.pytorch is imported yet, and both are installed"
    raise ConfigurationError(
        f"raylane cannot tell which Lightning your Trainer comes from: {problem}. To choose, pass "
        "lightning='lightning.pytorch' or lightning='pytorch_lightning' to get_strategy, or import only the one you "
        "train with (`import lightning.pytorch as pl` or `import pytorch_lightning as pl`)."
    )


def when_imported(callback: Callable[[ModuleType], object]) -> None:
    """Call ``callback(namespace_module)`` for each Lightning namespace imported now, and for each one imported later.

    raylane is often imported before Lightning (``import raylane.testing`` imports ``raylane`` first), and the
    namespace's registries must still learn raylane's strategies.
    """
    for name in imported_namespaces():
        callback(sys.modules[name])
    _WATCHER.callbacks.append(callback)
    if _WATCHER not in sys.meta_path:
        sys.meta_path.insert(0, _WATCHER)


class _NamespaceWatcher(importlib.abc.MetaPathFinder):
    """Finds a Lightning namespace as the other finders would, and runs the callbacks once it has been executed."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[ModuleType], object]] = []

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in FABRIC_OF:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is None:
                continue
            if not hasattr(spec.loader, "exec_module"):
                return None  # an unusual loader: import it the ordinary way, unwatched
            self._notify_after(spec.loader)
            return spec
        return None

    def _notify_after(self, loader: Any) -> None:
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            self._notify(module)

        loader.exec_module = exec_module

    def _notify(self, module: ModuleType) -> None:
        for callback in self.callbacks:
            try:
                callback(module)
            except Exception:  # importing Lightning must never fail because of raylane
                log.warning("raylane could not register with %s", module.__name__, exc_info=True)


_WATCHER = _NamespaceWatcher()


def namespace_of(obj: object) -> ModuleType:
    """The Lightning namespace a Trainer, strategy or callback (or a subclass of one) belongs to."""
    classes = obj.__mro__ if isinstance(obj, type) else type(obj).__mro__
    for cls in classes:
        for name in NAMESPACES:
            if cls.__module__ == name or cls.__module__.startswith(f"{name}."):
                return sys.modules[name]
    raise TypeError(f"{obj!r} is not a Lightning object")


def fabric(lightning: ModuleType) -> ModuleType:
    """The Fabric package that ships with ``lightning`` (cluster environments, rank-zero utilities)."""
    return importlib.import_module(FABRIC_OF[lightning.__name__])


def launcher_base(lightning: ModuleType) -> type:
    """Base class of a strategy's process launcher: ``launch(function, *args, trainer=..., **kwargs)`` and ``kill``."""
    return importlib.import_module(f"{lightning.__name__}.strategies.launchers.launcher")._Launcher  # type: ignore[no-any-return]


class LauncherSlot:
    """Mixin for a Lightning strategy: installs the launcher ``make_launcher()`` returns.

    Lightning's accelerator connector calls ``_configure_launcher`` once the strategy is fully set up, then hands each
    entry point (fit, validate, test, predict) to ``strategy.launcher.launch``.
    """

    _launcher: Any

    def make_launcher(self) -> Any:
        raise NotImplementedError

    def _configure_launcher(self) -> None:
        self._launcher = self.make_launcher()


def set_data_parallel_size(strategy: Any, size: int) -> None:
    """Make a ``ModelParallelStrategy`` (Lightning >= 2.4) build its mesh for ``size`` data-parallel ranks: an elastic
    run's count, which differs from the one the strategy was built for on the driver. Call before its
    ``setup_environment``."""
    strategy._data_parallel_size = size


def steps_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning's training loop takes an optimizer step after the current batch: every
    ``accumulate_grad_batches`` batches, and after the epoch's last batch, the rule one process follows. For a
    strategy whose engine must be told before the backward (DeepSpeed's accumulation boundary)."""
    return not trainer.fit_loop._should_accumulate()


def compiled_by_torch_compile(module: object) -> bool:
    """Whether the entry point got ``torch.compile(module)``: Lightning unwraps the compiled module and keeps torch's
    compiled callables on the LightningModule (``_compiler_ctx``), which cannot be pickled to the workers."""
    return getattr(module, "_compiler_ctx", None) is not None


def with_ckpt_path(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ckpt_path: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of a Trainer entry point (``Trainer._fit_impl``) with ``ckpt_path`` replaced, to resume a fit."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.arguments["ckpt_path"] = ckpt_path
    return bound.args, bound.kwargs


def ckpt_path_of(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``ckpt_path`` a Trainer entry point (``Trainer._fit_impl``, ``_validate_impl`` ...) was called with."""
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return bound.arguments.get("ckpt_path")


def tuner_exit(trainer: pl.Trainer) -> type[BaseException]:
    """The exception that ends a fit the Tuner ran only to search a learning rate (``Tuner(trainer).lr_find``)."""
    return importlib.import_module(f"{namespace_of(trainer).__name__}.utilities.exceptions")._TunerExitException  # type: ignore[no-any-return]


def finish_after_tuner_exit(trainer: pl.Trainer) -> None:
    """What Lightning's entry point does when the Tuner ends a fit: tear the run down, and mark it finished."""
    lightning = namespace_of(trainer)
    importlib.import_module(f"{lightning.__name__}.trainer.call")._call_teardown_hook(trainer)
    trainer._teardown()
    trainer.state.status = lightning.trainer.states.TrainerStatus.FINISHED
    trainer.state.stage = None


def learning_rate_finders(trainer: pl.Trainer) -> list[Any]:
    """The Trainer's ``LearningRateFinder`` callbacks: what ``Tuner(trainer).lr_find`` adds for its search."""
    finder = namespace_of(trainer).callbacks.LearningRateFinder
    return [callback for callback in trainer.callbacks if isinstance(callback, finder)]  # type: ignore[attr-defined]


def learning_rate_searches(trainer: pl.Trainer) -> list[tuple[Any, str | None, Any]]:
    """Each ``LearningRateFinder`` callback's search: what it found (``optimal_lr``), and the LightningModule
    attribute it set to the suggestion (``lr``, ``learning_rate``, ``hparams.lr``...) with its value, or None."""
    searches = []
    for callback in learning_rate_finders(trainer):
        attribute = value = None
        if callback._update_attr and callback.optimal_lr is not None:
            lightning = namespace_of(trainer).__name__
            lr_finder = importlib.import_module(f"{lightning}.tuner.lr_finder")
            attribute = lr_finder._determine_lr_attr_name(trainer.lightning_module, callback._attr_name)
            value = importlib.import_module(f"{lightning}.utilities.parsing").lightning_getattr(
                trainer.lightning_module, attribute
            )
        searches.append((callback.optimal_lr, attribute, value))
    return searches


def adopt_learning_rate_searches(trainer: pl.Trainer, searches: list[tuple[Any, str | None, Any]]) -> None:
    """Give this process's ``LearningRateFinder`` callbacks, and its LightningModule, what rank 0's searches found
    (:func:`learning_rate_searches`), as if they had run here."""
    for callback, (found, attribute, value) in zip(learning_rate_finders(trainer), searches):
        callback.optimal_lr = found
        if attribute is not None:
            parsing = importlib.import_module(f"{namespace_of(trainer).__name__}.utilities.parsing")
            parsing.lightning_setattr(trainer.lightning_module, attribute, value)


def predict_batch_indices(trainer: pl.Trainer) -> list[list[list[int]]]:
    """Dataset indices of every batch this process predicted, per dataloader.

    Lightning wraps predict dataloaders' batch samplers to record the indices they yield; other iterables (a Ray
    Dataset's shard) have none.
    """
    return [
        [list(batch) for batch in getattr(getattr(dataloader, "batch_sampler", None), "seen_batch_indices", [])]
        for dataloader in _predict_dataloaders(trainer)
    ]


def _predict_dataloaders(trainer: pl.Trainer) -> list[Any]:
    dataloaders = trainer.predict_dataloaders
    if isinstance(dataloaders, dict):
        return list(dataloaders.values())
    if isinstance(dataloaders, (list, tuple)):
        return list(dataloaders)
    return [] if dataloaders is None else [dataloaders]


def predict_batch_sizes(trainer: pl.Trainer) -> list[int | None]:
    """The batch size of each predict dataloader (None where a custom batch sampler decides)."""
    return [getattr(dataloader, "batch_size", None) for dataloader in _predict_dataloaders(trainer)]
