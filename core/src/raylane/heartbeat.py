"""Notice a worker that stopped answering, even when Ray does not report it dead.

Ray reports a killed process or a lost node within seconds, but a frozen process (stopped, swapped out, wedged in
the kernel) or a partitioned node stays "alive" as far as Ray knows, and the other ranks wait in their collective.
The driver therefore pings every worker on the actor's second thread; one that leaves a ping unanswered for
``heartbeat_timeout`` seconds fails the run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray

PING_PERIOD_S = 1.0
# The driver pings at most this many workers a second, however many there are: a ping costs it about 0.4 ms of CPU
# (benchmarks/startup_scaling.py), so 1,024 workers pinged every second would keep 40% of a core busy.
MAX_PINGS_PER_S = 100.0


def ping_period(workers: int, timeout_s: float) -> float:
    """Seconds between two pings of one worker: ``PING_PERIOD_S``, longer when more than ``MAX_PINGS_PER_S`` workers
    would be pinged a second, but never above a third of ``timeout_s``, so a live worker answers well within it."""
    return max(PING_PERIOD_S, min(workers / MAX_PINGS_PER_S, timeout_s / 3))


@dataclass(frozen=True)
class SilentWorker:
    """A rank that answered no ping for ``silent_s`` seconds."""

    rank: int
    silent_s: float


class Heartbeat:
    """Pings a fixed set of actors (by rank) and reports the first that stays silent past ``timeout_s``.

    Polled from the driver's wait loop: :meth:`check` never blocks.
    """

    def __init__(self, actors: Sequence[ray.actor.ActorHandle], timeout_s: float) -> None:
        self._actors = list(actors)
        self._timeout_s = timeout_s
        self._period_s = ping_period(len(self._actors), timeout_s)
        now = time.monotonic()
        self._last_answer = [now] * len(self._actors)
        self._pings: dict[ray.ObjectRef, int] = {}
        self._pinged_at = [0.0] * len(self._actors)

    def check(self) -> SilentWorker | None:
        """Collect answered pings, send new ones, and return a worker silent for too long (or ``None``)."""
        now = time.monotonic()
        if self._pings:
            answered, _ = ray.wait(list(self._pings), num_returns=len(self._pings), timeout=0)
            for ref in answered:
                rank = self._pings.pop(ref)
                self._last_answer[rank] = now  # an error answer (actor died) is left to the run's own ref
        waiting = set(self._pings.values())
        for rank, actor in enumerate(self._actors):
            if rank not in waiting and now - self._pinged_at[rank] >= self._period_s:
                self._pings[actor.pid.remote()] = rank
                self._pinged_at[rank] = now
        rank = min(range(len(self._actors)), key=self._last_answer.__getitem__, default=None)
        if rank is not None and now - self._last_answer[rank] > self._timeout_s:
            return SilentWorker(rank, now - self._last_answer[rank])
        return None
