"""How long warm workers wait for their Trainer's next entry point.

Keeping the actors between ``fit`` and ``test`` saves their whole start-up; holding CPUs or GPUs that other work is
waiting for would waste more than that. So idle workers leave after ``idle_timeout`` seconds, or as soon as a task,
actor or placement group anywhere in the cluster waits for a resource they hold, whichever comes first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping

from raylane import _ray

log = logging.getLogger(__name__)

POLL_S = 0.5


class IdleWatch:
    """Calls ``release(reason)`` once, on its own thread, when the idle time is up or others wait for ``held``.

    ``held`` names the resources whose release would help others (CPU, GPU, custom ones). It is empty when releasing
    frees nothing for anyone: workers inside a placement group someone else owns (a Tune trial's) return their
    resources to that group, not to the cluster.
    """

    def __init__(self, release: Callable[[str], None], timeout_s: float, held: Collection[str]) -> None:
        self._release = release
        self._timeout_s = timeout_s
        self._held = frozenset(held)
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raylane-idle-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def _watch(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        while not self._cancelled.wait(max(0.0, min(POLL_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self._release(f"idle for {self._timeout_s:g} s (idle_timeout)")
                return
            wanted = self._wanted_by_others()
            if wanted:
                self._release(f"other work waits for {', '.join(sorted(wanted))}")
                return

    def _wanted_by_others(self) -> set[str]:
        if not self._held:
            return set()
        demands = _ray.waiting_demands()
        if demands is None:  # this driver cannot see them (Ray Client): wait out the timeout instead of asking again
            self._held = frozenset()
            return set()
        return wanted_resources(demands, self._held)


def wanted_resources(demands: Collection[Mapping[str, float]], held: Collection[str]) -> set[str]:
    """The held resources some waiting demand asks for. A demand counts only when everything it asks for is among
    what is held: a GPU request gains nothing from workers that hold CPUs alone."""
    wanted: set[str] = set()
    for demand in demands:
        asked = {name for name, amount in demand.items() if amount > 0}
        if asked and asked <= set(held):
            wanted |= asked
    return wanted
