"""ray_lightning's strategy names and arguments, for scripts written for the archived ray_lightning (Lightning 1.6).

``RayStrategy``, ``RayShardedStrategy`` and ``HorovodRayStrategy`` take ray_lightning's arguments with their meanings
and return what :func:`raylane.get_strategy` returns for the ``ddp``, ``sharded`` and ``horovod`` backends. Arguments
that only meant something to ray_lightning or Lightning 1.x either fail, saying what to do instead (when dropping
them would change the training), or warn that they are ignored (when raylane decides it anyway). docs/migration.md
lists every difference.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from raylane import _lightning
from raylane.api import get_strategy
from raylane.errors import ConfigurationError

if TYPE_CHECKING:
    from pytorch_lightning.strategies import Strategy

LEGACY_BACKEND_ENV = "PL_TORCH_DISTRIBUTED_BACKEND"
"""Lightning 1.x chose the process group backend from this variable; ray_lightning told users to set it to gloo."""


class MigrationWarning(UserWarning):
    """A ray_lightning argument or setting that raylane accepts but ignores or reads differently."""


# Lightning 1.x strategy arguments and DDP arguments that raylane sets or places elsewhere: name -> what to do.
_REJECTED = {
    "accelerator": "raylane sets each worker's accelerator from use_gpu; drop it.",
    "parallel_devices": "raylane gives each worker the device Ray assigned; drop it.",
    "cluster_environment": "raylane's workers get their ranks from Ray; drop it.",
    "num_nodes": "the number of workers (num_workers) decides, wherever Ray places them; drop it.",
    "checkpoint_io": "pass it to the Trainer instead: pl.Trainer(plugins=[checkpoint_io]).",
    "precision_plugin": "pass it to the Trainer instead: pl.Trainer(plugins=[precision_plugin]) or precision=.",
    "sync_batchnorm": "pass it to the Trainer instead: pl.Trainer(sync_batchnorm=True).",
}
_IGNORED = {
    "device_ids": "raylane gives each worker the device Ray assigned it",
    "output_device": "raylane gives each worker the device Ray assigned it",
}


class _CompatStrategy:
    """Base of ray_lightning's names: classes, so a class path names them (LightningCLI's
    ``--trainer.strategy=raylane.compat.RayStrategy``), whose construction returns the raylane strategy that
    :func:`raylane.get_strategy` builds. Each is registered as a virtual subclass of Lightning's ``Strategy`` in every
    namespace, as the class path check of configuration tools requires."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _lightning.when_imported(lambda lightning: lightning.strategies.Strategy.register(cls))


class RayStrategy(_CompatStrategy):
    """ray_lightning's ``RayStrategy``: DDP on ``num_workers`` Ray actors, as ``get_strategy("ddp", ...)``.

    ``resources_per_worker`` may override the CPUs (``"CPU"``) and GPUs (``"GPU"``, fractions allowed; more than 0
    turns ``use_gpu`` on) of each worker; other keys are custom Ray resources. ``ddp_kwargs`` are the ``ddp``
    backend's options (``find_unused_parameters`` ...) or raylane's shared ones (``max_failures`` ...).
    """

    def __new__(  # type: ignore[misc]
        cls,
        num_workers: int = 1,
        num_cpus_per_worker: float = 1,
        use_gpu: bool = False,
        init_hook: Callable[[], Any] | None = None,
        resources_per_worker: Mapping[str, float] | None = None,
        **ddp_kwargs: Any,
    ) -> Strategy:
        options = _translate("RayStrategy", num_workers, num_cpus_per_worker, use_gpu, resources_per_worker, ddp_kwargs)
        _adopt_legacy_backend_env(options)
        return get_strategy("ddp", init_hook=init_hook, **options)

    def __init__(  # the signature configuration tools read; __new__ already returned the strategy
        self,
        num_workers: int = 1,
        num_cpus_per_worker: float = 1,
        use_gpu: bool = False,
        init_hook: Callable[[], Any] | None = None,
        resources_per_worker: Mapping[str, float] | None = None,
        **ddp_kwargs: Any,
    ) -> None: ...


class RayShardedStrategy(_CompatStrategy):
    """ray_lightning's ``RayShardedStrategy``: FairScale sharded DDP, as ``get_strategy("sharded")`` with FairScale.

    Arguments as :class:`RayStrategy`; ``ddp_kwargs`` are the ``sharded`` backend's options (FairScale's
    ``reduce_buffer_size``, ``broadcast_buffers`` ..., or ``engine="zero"`` for torch's own optimizer sharding).
    """

    def __new__(  # type: ignore[misc]
        cls,
        num_workers: int = 1,
        num_cpus_per_worker: float = 1,
        use_gpu: bool = False,
        init_hook: Callable[[], Any] | None = None,
        resources_per_worker: Mapping[str, float] | None = None,
        **ddp_kwargs: Any,
    ) -> Strategy:
        options = _translate(
            "RayShardedStrategy", num_workers, num_cpus_per_worker, use_gpu, resources_per_worker, ddp_kwargs
        )
        options.setdefault("engine", "fairscale")
        if os.environ.get(LEGACY_BACKEND_ENV):
            warnings.warn(
                f"{LEGACY_BACKEND_ENV} is ignored: the sharded backend uses nccl on GPUs and gloo on CPUs.",
                MigrationWarning,
                stacklevel=2,
            )
        return get_strategy("sharded", init_hook=init_hook, **options)

    def __init__(  # the signature configuration tools read; __new__ already returned the strategy
        self,
        num_workers: int = 1,
        num_cpus_per_worker: float = 1,
        use_gpu: bool = False,
        init_hook: Callable[[], Any] | None = None,
        resources_per_worker: Mapping[str, float] | None = None,
        **ddp_kwargs: Any,
    ) -> None: ...


class HorovodRayStrategy(_CompatStrategy):
    """ray_lightning's ``HorovodRayStrategy``: Horovod on ``num_workers`` Ray actors, as ``get_strategy("horovod")``.

    ``options`` are the ``horovod`` backend's (``compression``, ``op`` ...) or raylane's shared ones; ray_lightning
    had none.
    """

    def __new__(  # type: ignore[misc]
        cls, num_workers: int, num_cpus_per_worker: float = 1, use_gpu: bool = False, **options: Any
    ) -> Strategy:
        launch = _translate("HorovodRayStrategy", num_workers, num_cpus_per_worker, use_gpu, None, options)
        return get_strategy("horovod", **launch)

    def __init__(  # the signature configuration tools read; __new__ already returned the strategy
        self, num_workers: int, num_cpus_per_worker: float = 1, use_gpu: bool = False, **options: Any
    ) -> None: ...


def _translate(
    name: str,
    num_workers: int,
    num_cpus_per_worker: float,
    use_gpu: bool,
    resources_per_worker: Mapping[str, float] | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """get_strategy's options for ray_lightning's arguments (the caller's dicts are left as they were)."""
    _check_extra(name, extra)
    resources = dict(resources_per_worker or {})
    for key in list(resources):
        if key.upper() in ("CPU", "GPU") and key != key.upper():
            raise ConfigurationError(
                f"{name}(resources_per_worker={{{key!r}: ...}}): Ray spells it {key.upper()!r}; a lowercase key "
                "would reserve a custom resource that no node has."
            )
    options: dict[str, Any] = {"workers": num_workers, "cpus_per_worker": resources.pop("CPU", num_cpus_per_worker)}
    if "GPU" in resources:  # overrides use_gpu, as in ray_lightning: any GPUs turn it on, none turn it off
        gpus = resources.pop("GPU")
        options["use_gpu"] = gpus != 0
        if gpus != 0:
            options["gpus_per_worker"] = gpus  # raylane checks the amount (fractions below 1 GPU only)
    else:
        options["use_gpu"] = use_gpu
    if resources:
        options["resources_per_worker"] = resources
    clash = sorted(set(extra) & set(options))
    if clash:
        raise ConfigurationError(
            f"{name}({', '.join(clash)}=...) repeats what num_workers, num_cpus_per_worker, use_gpu and "
            "resources_per_worker already say; give each setting once."
        )
    return {**options, **{key: value for key, value in extra.items() if key not in _IGNORED}}


def _check_extra(name: str, extra: Mapping[str, Any]) -> None:
    for key in extra:
        if key in _REJECTED:
            raise ConfigurationError(f"{name}({key}=...) has no meaning in raylane: {_REJECTED[key]}")
        if key in _IGNORED:
            warnings.warn(f"{name}({key}=...) is ignored: {_IGNORED[key]}.", MigrationWarning, stacklevel=3)


def _adopt_legacy_backend_env(options: dict[str, Any]) -> None:
    """Honour Lightning 1.x's backend variable (ray_lightning's advice for shared GPUs) unless the option is given."""
    backend = os.environ.get(LEGACY_BACKEND_ENV)
    if not backend or "process_group_backend" in options:
        return
    warnings.warn(
        f"{LEGACY_BACKEND_ENV}={backend} is read as RayStrategy(process_group_backend={backend!r}); pass that "
        "instead, since Lightning 2 and raylane ignore the variable.",
        MigrationWarning,
        stacklevel=3,
    )
    options["process_group_backend"] = backend
