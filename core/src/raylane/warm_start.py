"""A Trainer's workers, started as soon as the Trainer is built, so its first entry point finds them warm.

Between building the Trainer and calling ``fit`` a script loads its data and builds its model. Meanwhile Ray can come
up (when raylane starts it: :mod:`raylane.local_ray`) and the worker actors can start and import torch and Lightning;
the first entry point then adopts them instead of starting its own (:meth:`raylane.launcher.RayLauncher`). Until it
does, they are idle workers like any others (:mod:`raylane.idle`): released as soon as other work waits for their
resources, or after ``idle_timeout`` seconds. When the Trainer is dropped first, they wait for the driver's next
Trainer under the same rules (:mod:`raylane.dropped_trainers`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import ray

from raylane import local_ray
from raylane.group import WorkerGroup
from raylane.host import BackendHost
from raylane.idle import IdleWatch
from raylane.options import LaunchOptions

log = logging.getLogger(__name__)

# An early start never queues behind other work for long: it gives up, and the entry point starts the workers.
RESOURCE_WAIT_S = 10.0
# How long a script's exit waits for an early start under way to let go of Ray (its longest wait is for resources).
WIND_UP_S = 3 * RESOURCE_WAIT_S


class WarmStart:
    """Starts one worker group on a thread of its own; :meth:`claim` hands it over once, :meth:`release` stops it."""

    def __init__(
        self,
        host: BackendHost,
        options: LaunchOptions,
        backend_options: Mapping[str, Any],
        preload: Sequence[str] = (),
    ) -> None:
        self.host, self.options = host, options
        self._backend_options = dict(backend_options)
        self._lock = threading.Lock()
        self._group: WorkerGroup | None = None
        self._job_id: str | None = None
        self._done = False  # claimed or released: the group is no longer this object's
        self._watch: IdleWatch | None = None
        self._thread = threading.Thread(
            target=self._start, args=(list(preload),), name="raylane-warm-start", daemon=True
        )
        _under_way.add(self)
        self._thread.start()

    def _start(self, preload: list[str]) -> None:
        group: WorkerGroup | None = None
        try:
            local_ray.wait_for_background_start()
            if not ray.is_initialized() or self.is_released():
                return
            group = WorkerGroup(self.host, _waiting_briefly(self.options), self._backend_options).start()
            if preload and not self.is_released():
                ray.get([actor.preload.remote(preload) for actor in group.actors])
        except Exception:  # the entry point starts its workers itself and reports what goes wrong then
            log.debug("raylane: starting the workers early failed", exc_info=True)
            if group is not None:
                group.shutdown()
            return
        with self._lock:
            if not self._done:
                self._group, self._job_id = group, ray.get_runtime_context().get_job_id()
                self._watch = _watch_idle(group, self.options.idle_timeout, self.release)
                return
        group.shutdown()  # released while starting

    def is_released(self) -> bool:
        """Whether the workers were claimed or released (by their idle watch, say): nothing is left to claim."""
        with self._lock:
            return self._done

    def serves(self, backend: str, options: LaunchOptions) -> bool:
        """Whether these workers, unless released, would serve a Trainer of ``backend`` with ``options``."""
        return not self.is_released() and self.host.backend == backend and self.options.same_workers(options)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until the start has ended; whether the workers are up and unclaimed."""
        self._thread.join(timeout_s)
        with self._lock:
            return not self._thread.is_alive() and self._group is not None

    def claim(self) -> WorkerGroup | None:
        """The started group, now the caller's to run and shut down; None when it could not start or was released.
        Waits for a start still under way (the entry point would otherwise start a second set of workers)."""
        self._thread.join()
        with self._lock:
            group, self._group, self._done = self._group, None, True
            if self._watch is not None:
                self._watch.cancel()
        if group is None:
            return None
        if self._job_id != ray.get_runtime_context().get_job_id():  # Ray was restarted: the handles are stale
            return None
        if not group.is_reusable():
            group.shutdown()
            return None
        return group

    def release(self, reason: str = "released") -> None:
        """Stop the group (or the start under way) and free its resources."""
        with self._lock:
            group, self._group, self._done = self._group, None, True
            if self._watch is not None:
                self._watch.cancel()
        if group is not None:
            log.info("raylane: releasing the workers started before the first entry point: %s.", reason)
            group.shutdown()


_under_way: weakref.WeakSet[WarmStart] = weakref.WeakSet()


def _wind_up_every_start() -> None:
    """At exit: release every early start, then wait (up to :data:`WIND_UP_S` each) until none uses Ray any more."""
    starts = list(_under_way)
    for start in starts:
        start.release("the script is exiting")
    for start in starts:
        start.wait(WIND_UP_S)


local_ray.before_stopping_ray(_wind_up_every_start)


def _waiting_briefly(options: LaunchOptions) -> LaunchOptions:
    return replace(options, resource_timeout=min(options.resource_timeout, RESOURCE_WAIT_S))


def _watch_idle(group: WorkerGroup, timeout_s: float, release: Callable[[str], None]) -> IdleWatch:
    reservation = group.reservation
    held = {}
    if reservation is not None and reservation.owned:
        held = reservation.held_per_node([placement.node_id for placement in group.placements])
    watch = IdleWatch(release, timeout_s, held)
    watch.start()
    return watch
