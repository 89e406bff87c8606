"""How long warm workers wait for their Trainer's next entry point.

Keeping the actors between ``fit`` and ``test`` saves their whole start-up; holding CPUs or GPUs that other work is
waiting for would waste more than that. So idle workers leave after ``idle_timeout`` seconds, or as soon as a task,
actor or placement group anywhere in the cluster waits for resources that their release would give it, whichever
comes first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping

from raylane import _ray
from raylane.placement import fits, summed

log = logging.getLogger(__name__)

POLL_S = 0.5

Resources = Mapping[str, float]


class IdleWatch:
    """Calls ``release(reason)`` once, on its own thread, when the idle time is up or others wait for ``held``.

    ``held`` maps each node id to the resources the workers hold there (CPU, GPU, custom ones). It is empty when
    releasing frees nothing for anyone: workers inside a placement group someone else owns (a Tune trial's) return
    their resources to that group, not to the cluster.
    """

    def __init__(self, release: Callable[[str], None], timeout_s: float, held: Mapping[str, Resources]) -> None:
        self._release = release
        self._timeout_s = timeout_s
        self._held = {node: dict(resources) for node, resources in held.items() if resources}
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raylane-idle-watch", daemon=True)
        self._deadline = time.monotonic() + timeout_s  # from start() on: when it started

    def start(self) -> None:
        self._deadline = time.monotonic() + self._timeout_s
        self._thread.start()

    @property
    def held(self) -> Mapping[str, Resources]:
        return self._held

    def remaining_s(self) -> float:
        """The idle time the workers have left."""
        return self._deadline - time.monotonic()

    def cancel(self) -> None:
        self._cancelled.set()

    def _watch(self) -> None:
        while not self._cancelled.wait(max(0.0, min(POLL_S, self.remaining_s()))):
            if self.remaining_s() <= 0:
                self._release(f"idle for {self._timeout_s:g} s (idle_timeout)")
                return
            wanted = self._wanted_by_others()
            if wanted:
                self._release(f"other work waits for {', '.join(sorted(wanted))}")
                return

    def _wanted_by_others(self) -> set[str]:
        if not self._held:
            return set()
        waiting = _ray.waiting_work()
        if waiting is None:  # this driver cannot see it (Ray Client): wait out the timeout instead of asking again
            self._held = {}
            return set()
        return helped_by_release(waiting.demands, waiting.free, self._held)


def helped_by_release(
    demands: Collection[Resources], free: Mapping[str, Resources], held: Mapping[str, Resources]
) -> set[str]:
    """The resources asked for by waiting demands that the workers' release would let run.

    A demand counts when it fits on no node as things stand (else it waits for something else, or only for the
    scheduler), but fits on a node where the workers hold resources once those return to it. So CPU workers ignore a
    GPU request, and nobody is released for a request that no node could ever hold.
    """
    wanted: set[str] = set()
    for demand in demands:
        asked = {name: amount for name, amount in demand.items() if amount > 0}
        if not asked or any(fits(asked, resources) for resources in free.values()):
            continue
        if any(fits(asked, summed([free.get(node, {}), resources])) for node, resources in held.items()):
            wanted |= asked.keys()
    return wanted
