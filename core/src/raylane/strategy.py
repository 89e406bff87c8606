"""What turns a Lightning parallel strategy into one that runs on raylane's Ray workers, in either Lightning namespace.

A backend writes its strategy once, naming the Lightning class it extends::

    class MyStrategy(RayStrategyMixin, lightning_base="DDPStrategy"):
        def __init__(self, workers: int = 2, **options): ...  # zero-argument super() reaches DDPStrategy

``MyStrategy.for_lightning(pytorch_lightning)`` (or ``lightning.pytorch``) is the real Lightning strategy class,
``MyStrategy`` + that namespace's ``DDPStrategy``, built once per namespace; ``MyStrategy(...)`` builds an instance of
the one for the Lightning this process imported. The mixin supplies the launcher, the ranks Ray decided and the
worker's device; the Lightning base class keeps doing the training.

A strategy written the older way, ``class MyStrategy(RayStrategyMixin, pytorch_lightning.strategies.DDPStrategy)``,
still works, for that namespace only.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from raylane import _lightning, relay, worker_only_weights
from raylane.elastic import check_can_resize
from raylane.options import LaunchOptions, split_options

if TYPE_CHECKING:
    from raylane.context import WorkerContext

log = logging.getLogger(__name__)

DRIVER_CHECKPOINT_WARNING = (
    "trainer.save_checkpoint on the driver saves the weights and progress, but no optimizer or LR-scheduler state: "
    "those lived on the raylane workers. Resuming from this file starts the optimizer afresh. To resume, use a "
    "checkpoint ModelCheckpoint wrote during fit (its files come back to the driver, e.g. "
    "trainer.checkpoint_callback.best_model_path), or pass weights_only=True to save the weights only."
)

LightningBase = str | Callable[[ModuleType], type]
"""The Lightning strategy a raylane strategy extends: a class name in ``<namespace>.strategies``, or a function of the
namespace module that returns the class."""


class RayClusterEnvironment:
    """Ranks and rendezvous exactly as the launcher assigned them.

    On the driver it describes a single rank-0 process; inside a worker it is filled from the worker's context. It is
    registered as a (virtual) ``ClusterEnvironment`` of each Lightning namespace a strategy is built for, so one class
    serves both.
    """

    def __init__(self) -> None:
        self.context: WorkerContext | None = None

    @property
    def creates_processes_externally(self) -> bool:
        return True  # the Ray launcher starts them, not Lightning

    @property
    def main_address(self) -> str:
        return self.context.master_addr if self.context else "127.0.0.1"

    @property
    def main_port(self) -> int:
        return self.context.master_port if self.context else 0

    @staticmethod
    def detect() -> bool:
        return False  # only ever chosen explicitly, by a raylane strategy

    def world_size(self) -> int:
        return self.context.world_size if self.context else 1

    def set_world_size(self, size: int) -> None:
        """Ignored: Ray's placement fixes the world size."""

    def global_rank(self) -> int:
        return self.context.global_rank if self.context else 0

    def set_global_rank(self, rank: int) -> None:
        """Ignored: Ray's placement fixes the ranks."""

    def local_rank(self) -> int:
        return self.context.local_rank if self.context else 0

    def node_rank(self) -> int:
        return self.context.node_rank if self.context else 0

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """Nothing to check: ``workers=`` decides, and the launcher rejects contradicting Trainer flags."""

    def teardown(self) -> None:
        """Nothing to undo: the launcher owns the workers."""


class _BuiltFor:
    """``MyStrategy.for_lightning_pytorch``: the strategy built for one namespace, under the name pickle finds it by.

    Built classes are named ``MyStrategy.for_<namespace>``, so a Ray worker (or any unpickler) rebuilds the same class
    from the backend's module instead of receiving it by value.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def __get__(self, instance: object, owner: type[RayStrategyMixin]) -> type:
        return owner.for_lightning(self.namespace)


def _attribute_for(namespace: str) -> str:
    return "for_" + namespace.replace(".", "_")


class RayStrategyMixin(_lightning.LauncherSlot):
    """Runs a Lightning ``ParallelStrategy`` subclass on raylane's workers. Subclass it with ``lightning_base=``."""

    backend_name: ClassVar[str]
    lightning: ClassVar[ModuleType | None] = None
    """The Lightning namespace module this class is built for; ``None`` on the namespace-free class a backend writes."""
    lightning_base: ClassVar[LightningBase | None] = None
    learning_rate_search_refusal: ClassVar[str | None] = None
    """Why the backend cannot run ``Tuner(trainer).lr_find`` (Lightning's ``LearningRateFinder``), which the driver
    then refuses before any worker starts; None when it can."""
    launch_options: LaunchOptions
    backend_options: dict[str, Any]
    cluster_environment: Any
    accelerator: Any

    def __init_subclass__(cls, lightning_base: LightningBase | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if lightning_base is not None:
            cls.lightning_base = lightning_base
        if "lightning" not in cls.__dict__:
            # The older way (a Lightning base class listed directly) binds the class to that base's namespace.
            try:
                cls.lightning = _lightning.namespace_of(cls)
            except TypeError:
                cls.lightning = None
        if cls.lightning is None:
            # The namespace-free class stands for its built classes (constructing it builds one), so configuration
            # tools that check a class path against Lightning's Strategy (LightningCLI's jsonargparse) accept it.
            _lightning.when_imported(lambda lightning: lightning.strategies.Strategy.register(cls))
        if "__init__" in cls.__dict__:
            _advertise_options(cls.__init__, _declared_backend_options(cls))

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # MyStrategy(...) on the namespace-free class: the instance is of the class for the Lightning in use.
        built = cls if cls.lightning is not None else cls.for_lightning(None)
        return super().__new__(built)

    @classmethod
    def for_lightning(cls, lightning: ModuleType | str | None) -> type:
        """This strategy as a real Lightning ``Strategy`` of namespace ``lightning`` (built once, then cached).

        ``lightning`` is ``pytorch_lightning`` or ``lightning.pytorch`` (the module or its name); ``None`` means the
        one this process imported.
        """
        module = _lightning.namespace(lightning)
        if cls.lightning is not None:
            if cls.lightning is not module:
                raise TypeError(
                    f"{cls.__qualname__} is a {cls.lightning.__name__} strategy and cannot run a {module.__name__} "
                    f"Trainer; write it as `class {cls.__name__}(RayStrategyMixin, lightning_base=...)` to get both."
                )
            return cls
        built = _BUILT.get((cls, module.__name__))
        return built if built is not None else _build(cls, module)

    @property
    def ray_environment(self) -> RayClusterEnvironment:
        if not isinstance(self.cluster_environment, RayClusterEnvironment):
            raise TypeError(
                f"{type(self).__name__} has cluster_environment={self.cluster_environment!r}, but raylane's workers "
                "get their ranks from Ray: pass cluster_environment=RayClusterEnvironment() (from raylane.strategy) to "
                "the Lightning base class, as in super().__init__(cluster_environment=RayClusterEnvironment(), ...)."
            )
        return self.cluster_environment

    def init_ray_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate ``get_strategy``-style options; keep the shared ones and return the backend's own.

        A backend option given as None counts as not given: that is the default configuration tools fill in.
        """
        from raylane.registry import backend_host

        known = backend_host(self.backend_name).backend_options()
        options = {name: value for name, value in options.items() if not (name in known and value is None)}
        self.launch_options, self.backend_options = split_options(options, known, self.backend_name)
        if self.launch_options.elastic:
            check_can_resize(backend_host(self.backend_name), self.launch_options, self.backend_options)
        return dict(self.backend_options)

    # ray_lightning's names for the launch options, read-only (user code and Tune setups read them off the strategy).
    @property
    def num_workers(self) -> int:
        """The number of Ray workers (``workers``): ray_lightning's name, read-only. With ``workers=(min, max)``, the
        world size of the last run (after an elastic resize, the final one), and ``max`` before any run."""
        context = getattr(getattr(self, "cluster_environment", None), "context", None)
        if context is not None:  # inside a worker: this run's
            return int(context.world_size)
        last = getattr(getattr(self, "_launcher", None), "last_world_size", None)
        return last if last is not None else self.launch_options.workers

    @property
    def num_cpus_per_worker(self) -> float:
        """CPUs each worker reserves (``cpus_per_worker``): ray_lightning's name, read-only."""
        return self.launch_options.cpus_per_worker

    @property
    def num_gpus_per_worker(self) -> float:
        """GPUs each worker reserves: 0 without ``use_gpu``, else ``gpus_per_worker`` (default 1). Read-only."""
        return self.launch_options.gpus

    @property
    def use_gpu(self) -> bool:
        """Whether the workers train on GPUs (``use_gpu``): ray_lightning's name, read-only."""
        return self.launch_options.gpus > 0

    @property
    def worker_context(self) -> WorkerContext | None:
        """This process's context inside a worker; ``None`` on the driver."""
        return self.ray_environment.context

    def make_launcher(self) -> Any:
        from raylane.launcher import RayLauncher

        return RayLauncher(self)

    def release_workers(self) -> None:
        """Stop this strategy's warm Ray workers now (they are otherwise kept for the Trainer's next entry point)."""
        launcher = getattr(self, "_launcher", None)
        if launcher is not None:
            launcher.release()

    def adopt_worker_context(self, context: WorkerContext) -> None:
        """Called inside a worker before the entry point: take the ranks and device the launcher assigned."""
        self.ray_environment.context = context
        assert self.lightning is not None, "only a strategy built for a Lightning namespace runs"
        accelerators = self.lightning.accelerators
        self.accelerator = accelerators.CUDAAccelerator() if context.uses_gpu else accelerators.CPUAccelerator()
        self.set_world_ranks()

    def set_world_ranks(self) -> None:
        from lightning_utilities.core.rank_zero import rank_zero_only

        # Ray decides ranks; nothing to compute, only Lightning's rank-zero guards (shared by both namespaces).
        rank_zero_only.rank = self.ray_environment.global_rank()  # type: ignore[attr-defined]

    @property
    def root_device(self) -> torch.device:
        context = self.worker_context
        return torch.device(context.device if context else "cpu")

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.ray_environment.world_size(), "rank": self.ray_environment.global_rank()}

    def process_dataloader(self, dataloader: object) -> object:
        """*Worker*: a Ray Dataset (``raylane.data.from_ray``) becomes this rank's shard; others pass through."""
        from raylane.shards import shard_for_rank

        return super().process_dataloader(shard_for_rank(self, dataloader))  # type: ignore[misc,no-any-return]

    def check_before_launch(self, trainer: Any) -> None:
        """*Driver*, at every entry point, before any actor starts: reject what only the Trainer or the model
        (``trainer.lightning_module``) can show is wrong, with a :class:`~raylane.ConfigurationError`. Does nothing
        here; a backend overrides it."""

    @property
    def reports_predictions(self) -> bool:
        """*Worker*: whether this rank's predictions go into what ``trainer.predict`` returns on the driver.

        Every rank's, by default. A backend whose ranks share samples (tensor-parallel ranks compute the same
        predictions) lets one rank of each group report them, so each sample comes back once.
        """
        return True

    def state_dict_for_driver(self) -> dict[str, Any]:
        """*Worker*, every rank, after ``fit``: the weights rank 0 sends to the driver's LightningModule.

        Lightning's ``lightning_module_state_dict`` by default. A sharding backend whose checkpoints hold shards
        overrides it to gather the full weights (every rank takes part; only rank 0's result is used).
        """
        return self.lightning_module_state_dict()  # type: ignore[attr-defined,no-any-return]

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        # Lightning enters it around configure_model (and nothing else): when the hook has built its layers, they
        # take the weights the last fit trained, which the driver could not hold (raylane.worker_only_weights).
        with super().model_sharded_context():  # type: ignore[misc]
            yield
        module = self.lightning_module  # type: ignore[attr-defined]
        weights = worker_only_weights.kept(module) if module is not None else {}  # None: entered by hand, unconnected
        if weights:
            self.load_weights_from_driver(weights)

    def load_weights_from_driver(self, weights: Mapping[str, torch.Tensor]) -> None:
        """*Worker*, every rank, right after ``configure_model``: copy the full tensors ``weights`` (by state-dict name)
        into the layers that hook built, before the strategy's ``setup`` wraps the model or builds its optimizers.

        They are the last fit's trained weights of layers the driver's model lacks. Plain parameters and DTensors
        (each rank takes its shard) by default; a backend whose engine partitions parameters already in
        ``configure_model`` (DeepSpeed's ZeRO-3) overrides it. Names the model lacks are skipped.
        """
        worker_only_weights.copy_into(self.lightning_module, weights)  # type: ignore[attr-defined]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.ray_environment.context is None and checkpoint.get("optimizer_states") == []:
            warnings.warn(DRIVER_CHECKPOINT_WARNING, UserWarning, stacklevel=2)
        self.write_checkpoint(checkpoint, filepath, storage_options)
        # Tell the driver where the newest checkpoint is, so it can restart a failed fit from it (max_failures).
        if self.ray_environment.global_rank() == 0:
            relay.send(relay.CHECKPOINT_SAVED, str(filepath))

    def write_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write one checkpoint to ``filepath``, on every rank (and on the driver for its ``trainer.save_checkpoint``).

        The Lightning strategy's own save by default. A backend whose Lightning strategy saves through local paths
        only takes URLs through :class:`raylane.staged_checkpoints.StagedURLCheckpoints`, which overrides it."""
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]


_BUILT: dict[tuple[type, str], type] = {}
for _namespace in _lightning.NAMESPACES:
    setattr(RayStrategyMixin, _attribute_for(_namespace), _BuiltFor(_namespace))


def _build(body: type[RayStrategyMixin], lightning: ModuleType) -> type:
    if body.lightning_base is None:
        raise TypeError(f"{body.__qualname__} names no Lightning strategy to extend; subclass with lightning_base=...")
    base = body.lightning_base
    base_class = getattr(lightning.strategies, base) if isinstance(base, str) else base(lightning)
    _register_virtual_subclasses(lightning)
    names = {
        "__module__": body.__module__,
        "__qualname__": f"{body.__qualname__}.{_attribute_for(lightning.__name__)}",
        "__doc__": body.__doc__,
        "lightning": lightning,
    }
    built = types.new_class(body.__name__, (body, base_class), exec_body=lambda namespace: namespace.update(names))
    _BUILT[body, lightning.__name__] = built
    return built


def _declared_backend_options(strategy: type) -> Mapping[str, str]:
    """The backend's own options, or none when its registry entry cannot be read yet (a plugin mid-import)."""
    from raylane.registry import backend_host

    name = getattr(strategy, "backend_name", None)
    if not name:
        return {}
    try:
        return backend_host(name).backend_options()
    except Exception:
        log.debug("backend %r did not list its options for %s's signature", name, strategy.__name__, exc_info=True)
        return {}


def _advertise_options(init: Callable[..., None], backend_options: Iterable[str]) -> None:
    """Show every option in the signature of a strategy's ``__init__(self, workers, **options)``.

    Tools that configure a class from its signature (LightningCLI's ``--trainer.strategy.cpus_per_worker 2``) then
    know them: the shared launch options with their types and defaults, and the backend's own ones with default None
    (the backend's default).
    """
    signature = inspect.signature(init)
    named = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    if not rest:
        return
    types = typing.get_type_hints(LaunchOptions)
    present = {p.name for p in named}
    shared = [
        inspect.Parameter(
            option.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=option.default if option.default is not dataclasses.MISSING else option.default_factory(),  # type: ignore[misc]
            annotation=types[option.name],
        )
        for option in dataclasses.fields(LaunchOptions)
        if option.name not in present
    ]
    present |= {p.name for p in shared}
    own = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any)
        for name in backend_options
        if name not in present
    ]
    init.__signature__ = signature.replace(parameters=[*named, *shared, *own, *rest])  # type: ignore[attr-defined]


def _register_virtual_subclasses(lightning: ModuleType) -> None:
    """One environment and one launcher class serve both namespaces: each namespace's base class adopts them."""
    from raylane.launcher import RayLauncher

    _lightning.fabric(lightning).plugins.environments.ClusterEnvironment.register(RayClusterEnvironment)
    _lightning.launcher_base(lightning).register(RayLauncher)
