"""The hooks a raylane backend implements. This module holds only the specifications.

A backend is a module (or object) with functions marked ``@raylane.hookimpl`` whose names match these specs. An
implementation may accept any subset of a spec's arguments, so new arguments can be added without breaking backends.
The core's own defaults (:mod:`raylane.builtin`) register through these same hooks and run after a backend's, so a
backend overrides a default by answering first (``firstresult`` hooks) or contributes next to it (list hooks).

Where each hook runs: *driver* hooks run in the process that called ``trainer.fit()``; *worker* hooks run inside every
Ray worker actor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from raylane.context import WorkerContext
    from raylane.options import LaunchOptions
    from raylane.placement import WorkerReservation
    from raylane.topology import DeviceAssignment, WorkerPlacement

PROJECT_NAME = "raylane"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Mark a backend's hook implementations with this; plugin authors import it as ``raylane.hookimpl``."""


@hookspec(firstresult=True)
def raylane_strategy_class(lightning: ModuleType) -> type[pl.strategies.Strategy]:
    """*Driver.* The Lightning ``Strategy`` subclass that runs this backend, for the Lightning namespace ``lightning``.

    ``lightning`` is the module the user's Trainer comes from: ``pytorch_lightning`` or ``lightning.pytorch``, whose
    Trainers each accept only their own strategies. Write the strategy once as
    ``class MyStrategy(RayStrategyMixin, lightning_base="DDPStrategy")`` (see :mod:`raylane.strategy`) and return
    ``MyStrategy.for_lightning(lightning)``. An implementation without the argument (the hook's first form) may return
    a ``pytorch_lightning`` strategy; it then serves ``pytorch_lightning`` Trainers only. Import the class inside the
    implementation, so listing backends never imports heavy modules.
    """


@hookspec
def raylane_backend_options() -> Mapping[str, str]:
    """*Driver.* The backend's own ``get_strategy`` options, each mapped to a one-line description.

    Options outside these and the shared :class:`raylane.options.LaunchOptions` are rejected with the full list.
    """


@hookspec(firstresult=True)
def raylane_placement_bundles(options: LaunchOptions) -> list[dict[str, float]]:
    """*Driver.* The placement-group bundles, one per worker in rank order (worker launch).

    The default reserves ``options.worker_resources()`` per worker. A backend answers when its workers need a different
    shape (for example an extra bundle for a coordinator). The Tune bridge asks this hook to size a trial.
    """


@hookspec(firstresult=True)
def raylane_resumes_on_any_world_size(options: LaunchOptions, backend_options: Mapping[str, Any]) -> bool:
    """*Driver.* Whether a fit this backend checkpointed on N workers resumes from that checkpoint on M workers.

    An elastic run (``workers=(min, max)``) restarts from its newest checkpoint with however many workers fit, so a
    backend whose checkpoints hold per-rank state that only the same world size can load (DeepSpeed's ZeRO partitions)
    must not get one: the core rejects the range with a :class:`~raylane.ConfigurationError` when the strategy is
    built, before any actor starts. The core's default answers False; a backend answers True when its checkpoints
    hold whole tensors or reshard on load (``backend_options`` are its own options, for backends where that depends on
    them).
    """


@hookspec(firstresult=True)
def raylane_workers_that_fit(options: LaunchOptions) -> int | None:
    """*Driver.* How many workers of ``options.worker_resources()`` could start now (each attempt of an elastic run).

    An elastic run (``workers=(min, max)``) starts, and restarts after a failure, with as many workers as this says
    fit, kept between ``options.min_workers`` and ``options.workers``. The default counts what the cluster's nodes have
    free (``None`` when Ray cannot say: the run then tries the most workers briefly, then the fewest). An extension
    answers when the workers go into resources it already holds, as the Tune bridge does with a trial's bundles.
    """


@hookspec(firstresult=True)
def raylane_reserve_workers(bundles: list[dict[str, float]], options: LaunchOptions, name: str) -> WorkerReservation:
    """*Driver.* Where the workers go: a placement group and, per worker, the index of its bundle (worker launch).

    The default creates a placement group of ``bundles`` named ``name`` (failing fast when the cluster can never hold
    it, waiting up to ``options.resource_timeout`` when it is busy) and releases it after the run. An extension answers
    when the workers must go into a placement group that already exists, such as a Ray Tune trial's; it returns a
    reservation with ``owned=False`` so the core leaves that group alone afterwards.
    """


@hookspec
def raylane_worker_actor_options(options: LaunchOptions, bundle_index: int) -> dict[str, Any]:
    """*Driver.* Keyword arguments for ``ActorClass.options(...)`` of the worker in ``bundle_index`` (worker launch).

    Results are merged, the core's defaults first, so a backend can add (``runtime_env``, ``max_restarts``) or override.
    Placement in the bundle is always set by the core afterwards. In ``options.runtime_env`` the local ``working_dir``
    and ``py_modules`` folders are already uploaded (once for all the workers) and named by their Ray URIs.
    """


@hookspec(firstresult=True)
def raylane_assign_devices(placements: Sequence[WorkerPlacement], options: LaunchOptions) -> list[DeviceAssignment]:
    """*Driver.* The device of each worker and the ``CUDA_VISIBLE_DEVICES`` it sees (GPU assignment).

    ``placements`` are in rank order and carry the GPU ids Ray gave each actor. The default shares all of a node's
    assigned GPUs with every worker on that node and picks each worker's own first GPU.
    """


@hookspec
def raylane_worker_env(context: WorkerContext) -> Mapping[str, str]:
    """*Driver.* Environment variables to set in a worker before its process group starts.

    Every implementation contributes; later (backend) values win over the core's. The core sets the rank variables
    (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), the allow-listed driver variables and the user's
    ``env=``.
    """


@hookspec
def raylane_setup_process_group(context: WorkerContext) -> None:
    """*Worker.* Bring up the backend's communication (``init_process_group``, ``hvd.init()`` ...).

    Runs on every worker after the environment is set and before the Lightning entry point.
    """


@hookspec
def raylane_teardown_process_group(context: WorkerContext) -> None:
    """*Worker.* Undo :func:`raylane_setup_process_group` after the Lightning entry point, even when it failed."""


@hookspec
def raylane_collect_results(trainer: pl.Trainer, context: WorkerContext) -> Mapping[str, Any] | None:
    """*Worker, rank 0.* Extra values to send to the driver when the entry point finishes (metric relay).

    Return a mapping whose keys are namespaced by the plugin (``"myplugin.key"``); the driver hands the merged mapping
    to :func:`raylane_apply_results`. Values must be picklable; move tensors to the CPU.
    """


@hookspec
def raylane_apply_results(trainer: pl.Trainer, results: Mapping[str, Any]) -> None:
    """*Driver.* Consume what :func:`raylane_collect_results` sent, after the core restored weights and metrics."""


@hookspec
def raylane_relay_metrics(trainer: pl.Trainer, topic: str, payload: Any) -> None:
    """*Driver.* A message rank 0 sent with :func:`raylane.relay.send` while the entry point is still running.

    Messages arrive in order, in batches, while the driver waits for the workers (metric relay). Use it for progress
    that must reach the driver before training ends, such as Ray Tune reports.
    """
