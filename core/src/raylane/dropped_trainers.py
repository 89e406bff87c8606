"""The idle workers of Trainers this driver dropped, kept for its next Trainer under the rules idle workers live by.

A Trainer built inside a function (``def train(lr): trainer = pl.Trainer(...); trainer.fit(...)``) is dropped when
the function returns, and Python frees it when its garbage collector next runs (Lightning's objects form cycles): before
the next Trainer is built, or while it starts, or later. Were its workers stopped then, a loop over settings would pay
the workers' whole start-up on some turns and not on others. They wait here instead, so the next Trainer whose workers
would look the same trains on them whatever the collector did. They leave as a live Trainer's idle workers do: after the
rest of their ``idle_timeout``, at once when other work waits for what they hold (:mod:`raylane.idle`), when this driver
starts other workers, at exit, or by :func:`raylane.release_idle_workers`. The same goes for the workers a Trainer
started when it was built (:mod:`raylane.warm_start`) and dropped before its first entry point: a notebook cell that
builds the Trainer, run again before the cell that fits.

Workers inside a placement group someone else owns (a Tune trial's) are stopped when their Trainer is dropped: the
bundles they hold belong to that group's next user. So are those of a strategy with ``reuse_workers=False``, which no
Trainer may take.
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raylane import local_ray
from raylane.group import WorkerGroup
from raylane.idle import IdleWatch
from raylane.options import LaunchOptions

if TYPE_CHECKING:
    from raylane.warm_start import WarmStart

log = logging.getLogger(__name__)

# Reentrant: a launcher's finalizer may run inside any allocation, this module's own included.
_lock = threading.RLock()
_kept: list[tuple[WorkerGroup, IdleWatch]] = []
_kept_starts: list[WarmStart] = []  # each with its own idle watch, which releases it by the same rules
_exiting = False


@dataclass
class Idleness:
    """The watch over a launcher's idle workers (None while an entry point runs): kept by the launcher, read by
    :func:`keep_or_stop` once the launcher is dropped (a finalizer may not hold the launcher itself)."""

    watch: IdleWatch | None = None

    def end(self) -> None:
        """The workers are busy, released or handed over: their watch stops."""
        if self.watch is not None:
            self.watch.cancel()
        self.watch = None


def keep_or_stop(group: WorkerGroup, idleness: Idleness) -> None:
    """A dropped launcher's workers: kept for this driver's next Trainer while their idle time lasts, else stopped."""
    launchers_watch = idleness.watch  # it releases through the launcher, which is gone
    remaining = launchers_watch.remaining_s() if launchers_watch is not None else 0.0
    held = launchers_watch.held if launchers_watch is not None else {}
    idleness.end()
    reservation = group.reservation
    with _lock:
        keep = (
            not _exiting
            and bool(group.actors)
            and group.options.reuse_workers  # else no Trainer could take them
            and remaining > 0
            and reservation is not None
            and reservation.owned
        )
        if keep:
            watch = IdleWatch(lambda reason: _release(group, reason), remaining, held)
            _kept.append((group, watch))
    if not keep:
        group.shutdown()
        return
    watch.start()


def keep_early_start(start: WarmStart) -> None:
    """A launcher dropped before its first entry point: the workers it started early wait for the next Trainer."""
    with _lock:
        if not _exiting and start.options.reuse_workers:
            _kept_starts.append(start)
            return
    start.release("its Trainer was dropped")


def has_like(backend: str, options: LaunchOptions) -> bool:
    """Whether a dropped Trainer's idle workers would serve a Trainer of ``backend`` with ``options``."""
    with _lock:
        return any(group.serves(backend, options) for group, _ in _kept) or any(
            start.serves(backend, options) for start in _kept_starts
        )


def take_early_start(backend: str, options: LaunchOptions) -> WarmStart | None:
    """The early workers of a Trainer dropped before its first entry point, for a Trainer they would serve."""
    with _lock:
        for released in [start for start in _kept_starts if start.is_released()]:
            _kept_starts.remove(released)  # in place: a finalizer may append meanwhile
        start = next((start for start in _kept_starts if start.serves(backend, options)), None)
        if start is not None:
            _kept_starts.remove(start)
        return start


def take(backend: str, options: LaunchOptions) -> WorkerGroup | None:
    """A dropped Trainer's idle workers for a Trainer whose workers would look the same and that still answer and
    run today's code (:meth:`WorkerGroup.is_reusable`); None when there are none."""
    while True:
        with _lock:
            entry = next(((g, w) for g, w in _kept if g.serves(backend, options)), None)
            if entry is None:
                return None
            _kept.remove(entry)
        group, watch = entry
        watch.cancel()
        if group.is_reusable():  # pinged outside the lock: a frozen worker's ping takes seconds
            return group
        group.shutdown()


def release_all(reason: str) -> None:
    """Stop every dropped Trainer's idle workers now."""
    with _lock:
        entries, starts = list(_kept), list(_kept_starts)
        _kept.clear()
        _kept_starts.clear()
    if entries:
        log.info("raylane: releasing the idle warm workers of dropped Trainers: %s.", reason)
    for group, watch in entries:
        watch.cancel()
        group.shutdown()
    for start in starts:
        start.release(reason)


def _release(group: WorkerGroup, reason: str) -> None:
    with _lock:
        entry = next((e for e in _kept if e[0] is group), None)
        if entry is None:  # taken by a Trainer meanwhile
            return
        _kept.remove(entry)
    log.info("raylane: releasing the idle warm workers of a dropped Trainer: %s.", reason)
    group.shutdown()


def _stop_all_at_exit() -> None:
    """From now on nothing is kept: the driver exits. Whether the launchers' finalizers run before this or after
    (both are exit hooks), every kept worker is stopped."""
    global _exiting
    with _lock:
        _exiting = True
    release_all("the driver exits")


atexit.register(_stop_all_at_exit)
local_ray.before_stopping_ray(_stop_all_at_exit)  # before raylane stops the Ray it started
