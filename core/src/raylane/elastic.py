"""Elastic worker counts (``workers=(min, max)``): how many workers a run gets, when it grows, how its ranks stop.

The driver sizes every attempt of an entry point by what fits now (:func:`planned_size`). While a ``fit`` runs with
fewer than ``max`` workers, a :class:`GrowWatch` on the driver looks at the cluster's free resources; once room for
more workers has stayed free for ``grow_after_s`` seconds it asks rank 0 (:func:`request_resize`, through the actor).
On the workers a callback (:func:`prepare_worker`) agrees at the next end of a training epoch that every rank stops,
saves a checkpoint there and tells the driver (topic :data:`RESIZE_SAVED`), which starts the fit again from it with
more workers. Stopping only at the end of an epoch keeps the resumed epoch and step counts exact: Lightning resumes a
mid-epoch checkpoint by replaying the epoch's batches, and the number of batches per epoch changes with the world size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from raylane import _lightning, _ray, relay
from raylane.errors import ConfigurationError
from raylane.placement import fits, summed

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from raylane.context import WorkerContext
    from raylane.host import BackendHost
    from raylane.options import LaunchOptions

log = logging.getLogger(__name__)

RESIZE_SAVED = "raylane.resize_saved"
"""Topic of rank 0's message: it saved the checkpoint a resize restarts from (the payload is its path)."""
POLL_S = 1.0
BRIEF_WAIT_S = 10.0  # how long an attempt waits for more than min_workers that looked free when it was sized
RESIZE_CHECKPOINT_PREFIX = "raylane-resize"

Resources = Mapping[str, float]


def check_can_resize(host: BackendHost, options: LaunchOptions, backend_options: Mapping[str, Any]) -> None:
    """Reject ``workers=(min, max)`` for a backend whose checkpoints cannot resume on another number of workers."""
    if host.resumes_on_any_world_size(options, backend_options):
        return
    raise ConfigurationError(
        f"workers=({options.min_workers}, {options.workers}): backend {host.backend!r} cannot resume a fit from its "
        "checkpoints on another number of workers (its raylane_resumes_on_any_world_size hook says so, for these "
        f"options), so its worker count cannot change during a run. Pass a fixed count, e.g. workers={options.workers}."
    )


# -- driver: sizing ----------------------------------------------------------------------------------------------


def workers_that_fit(
    options: LaunchOptions, free: Mapping[str, Resources], held: Mapping[str, Resources] | None = None
) -> int:
    """How many workers of ``options.worker_resources()`` the nodes' ``free`` resources hold, with ``held`` (what this
    run's own workers hold per node, back once they stop) added, placed as ``options.placement_strategy`` allows."""
    bundle = options.worker_resources()
    per_node = []
    for node in set(free) | set(held or {}):
        available = summed([free.get(node, {}), (held or {}).get(node, {})])
        per_node.append(_copies(bundle, available))
    if not per_node:
        return 0
    if options.placement_strategy == "STRICT_PACK":
        return max(per_node)
    if options.placement_strategy == "STRICT_SPREAD":
        return sum(1 for count in per_node if count)
    return sum(per_node)


def _copies(bundle: Resources, available: Resources) -> int:
    if not fits(bundle, available):
        return 0
    return int(min((available.get(name, 0) + 1e-9) // amount for name, amount in bundle.items() if amount > 0))


def free_resources() -> dict[str, Resources] | None:
    """Each node's free resources, or None where Ray cannot say (a Ray Client driver)."""
    waiting = _ray.waiting_work()
    return None if waiting is None else dict(waiting.free)


def planned_size(host: BackendHost, options: LaunchOptions, at_least: int = 0) -> int:
    """The worker count to try now: as many as fit (hook ``raylane_workers_that_fit``), within ``[min_workers,
    workers]`` and not below ``at_least`` (what a grow decision counted while the run still held its workers).
    ``workers`` when nothing can say."""
    fitting = host.workers_that_fit(options)
    fitting = options.workers if fitting is None else fitting
    assert options.min_workers is not None
    return max(options.min_workers, min(options.workers, max(fitting, at_least)))


class GrowWatch:
    """Calls ``grow(target)`` once, on its own thread, when room for more than ``size`` workers (up to the most,
    ``options.workers``) has stayed free for ``options.grow_after_s`` seconds. ``held``: what the run's workers hold
    per node (they count as room, since a resize releases them first)."""

    def __init__(
        self, options: LaunchOptions, size: int, held: Mapping[str, Resources], grow: Callable[[int], None]
    ) -> None:
        self._options = options
        self._size = size
        self._held = held
        self._grow = grow
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raylane-grow-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def _watch(self) -> None:
        room_since: float | None = None
        while not self._cancelled.wait(POLL_S):
            free = free_resources()
            if free is None:
                return  # nothing to watch with: the run keeps its size
            target = min(self._options.workers, workers_that_fit(self._options, free, self._held))
            if target <= self._size:
                room_since = None
                continue
            room_since = room_since if room_since is not None else time.monotonic()
            if time.monotonic() - room_since >= self._options.grow_after_s:
                if not self._cancelled.is_set():
                    self._grow(target)
                return


# -- workers: stopping at an epoch's end to resize ----------------------------------------------------------------

_resize_requested = threading.Event()


def request_resize() -> None:
    """*Worker* (the actor's second thread): stop at the next end of a training epoch so the driver can resize."""
    _resize_requested.set()


def resize_requested() -> bool:
    """*Worker*: whether this rank was asked to stop at its next epoch end for a resize (it then still finishes the
    epoch)."""
    return _resize_requested.is_set()


def prepare_worker(trainer: pl.Trainer, context: WorkerContext) -> None:
    """*Worker*, before each entry point: a fit that may still grow gets the callback that stops it for a resize."""
    _resize_requested.clear()
    options: LaunchOptions = trainer.strategy.launch_options  # type: ignore[attr-defined]
    if trainer.state.fn != _lightning.FITTING or not options.elastic or context.world_size >= options.workers:
        return
    trainer.callbacks.append(_stop_for_resize_class(_lightning.namespace_of(trainer))())


@cache
def _stop_for_resize_class(lightning: ModuleType) -> type:
    class StopForResize(lightning.Callback):  # type: ignore[misc,name-defined]
        """Every rank agrees at each epoch's end whether a resize was asked for; if so they checkpoint and stop."""

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if _training_ends_anyway(trainer):
                return
            # Only rank 0 is asked; the reduction makes every rank stop at the same epoch.
            if not trainer.strategy.reduce_boolean_decision(_resize_requested.is_set(), all=False):
                return
            _resize_requested.clear()
            path = resize_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            trainer.should_stop = True
            relay.send(RESIZE_SAVED, path)  # rank 0's message; a no-op on the others

    return StopForResize


def _training_ends_anyway(trainer: pl.Trainer) -> bool:
    """Whether this epoch is the fit's last one, or Lightning would not stop yet (min_epochs, min_steps)."""
    loop = trainer.fit_loop
    epochs_done = trainer.current_epoch + 1
    if trainer.max_epochs not in (None, -1) and epochs_done >= trainer.max_epochs:
        return True
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    if loop.min_epochs is not None and epochs_done < loop.min_epochs:
        return True
    return loop.min_steps is not None and trainer.global_step < loop.min_steps


def resize_checkpoint_path(trainer: pl.Trainer) -> str:
    """Beside the ModelCheckpoint's files (the storage the user chose for checkpoints), else under
    ``default_root_dir``: the new rank 0, maybe on another node, must read it."""
    directory = getattr(trainer.checkpoint_callback, "dirpath", None) or f"{trainer.default_root_dir}/checkpoints"
    name = f"{RESIZE_CHECKPOINT_PREFIX}-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
    return f"{str(directory).rstrip('/')}/{name}"
