"""A local Ray for scripts that do not connect to a cluster: started by the first entry point, or earlier, in the
background, while the script goes on importing and loading its data (:func:`start_ray_in_background`)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

log = logging.getLogger(__name__)

# What every worker actor imports before it can run anything; the Lightning namespace the driver uses is added.
WORKER_MODULES = ("raylane.worker",)
LIGHTNING_NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


class _BackgroundStart:
    """``ray.init`` on a thread of its own, which then stays alive: Ray's processes are started with a parent-death
    signal tied to the starting thread, so they would be killed if the thread ended."""

    def __init__(self, num_cpus: int, preload_modules: list[str]) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(num_cpus, preload_modules), name="raylane-ray-start", daemon=True
        )
        self._thread.start()

    def _run(self, num_cpus: int, preload_modules: list[str]) -> None:
        try:
            _init_local(num_cpus, preload_modules)
        except BaseException as err:  # handed to the thread that waits for Ray
            self._error = err
        finally:
            self._ready.set()
        if self._error is None:
            threading.Event().wait()

    def wait(self) -> None:
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"starting Ray in the background failed: {self._error}") from self._error


_background: _BackgroundStart | None = None


def start_ray_in_background(num_cpus: int | None = None, preload: bool = False) -> None:
    """Start a local Ray now, without waiting for it: the script's next lines (imports, loading data, building the
    model) run while Ray comes up, and the first ``trainer.fit()`` waits only for what is left. Call it right after
    ``import raylane``, before importing Lightning and loading data, so there is something to overlap.

    With ``preload=True`` Ray's worker processes import torch, Lightning and raylane as they start (one idle worker per
    CPU starts at once), so the first entry point's workers start without importing them. That pays off only when the
    script has that long (tens of seconds on a busy laptop) before its first ``fit``: until the idle workers are
    ready, the entry point starts workers of its own, which import the same modules on the same cores. Every Python
    worker Ray starts in this session then imports them too. ``num_cpus`` defaults to this machine's CPU count. Does
    nothing when Ray is already running, when ``RAY_ADDRESS`` names a cluster, or when called twice.
    """
    global _background
    if _background is not None or ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return
    # Worked out here, not on the thread: looking for a package can import it, and two threads importing the same
    # packages at once can deadlock.
    _background = _BackgroundStart(num_cpus or os.cpu_count() or 1, _preload_modules() if preload else [])


def ensure_ray(cpus_needed: float) -> None:
    """Connect to Ray, starting a local instance when none is running (the laptop case).

    A local instance gets at least the CPUs the workers ask for, so ``workers=4`` runs on a 2-core laptop
    (oversubscribed) instead of waiting forever. On a cluster (``RAY_ADDRESS`` set or ``ray.init`` called) nothing is
    started. A start begun by :func:`start_ray_in_background` is waited for.
    """
    if _background is not None:
        _background.wait()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    _init_local(max(os.cpu_count() or 1, int(-(-cpus_needed // 1))), [])


def _init_local(num_cpus: int, preload_modules: list[str]) -> None:
    log.info("raylane: starting a local Ray instance with %d CPUs", num_cpus)
    system_config = {"preload_python_modules": preload_modules} if preload_modules else None
    with _quiet_signal_warning():
        # address="local": our own instance, even when `ray start` left another cluster's address on this machine.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            _system_config=system_config,
        )


def _preload_modules() -> list[str]:
    """raylane's worker module and the Lightning the workers will unpickle: the one the driver imported, or, when it
    has imported none yet (the call came first, as it should), whichever is installed."""
    lightning = [name for name in LIGHTNING_NAMESPACES if name in sys.modules] or [
        name for name in LIGHTNING_NAMESPACES if _installed(name)
    ][:1]
    return [*WORKER_MODULES, *lightning]


def _installed(module: str) -> bool:
    # The top-level package only: finding "lightning.pytorch" would import all of "lightning".
    return importlib.util.find_spec(module.partition(".")[0]) is not None


@contextmanager
def _quiet_signal_warning() -> Iterator[None]:
    """Ray warns that it cannot install its SIGTERM handler off the main thread: expected here, and the driver keeps
    its own handlers."""
    logger = logging.getLogger("ray._private.worker")
    logger.addFilter(_not_signal_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_signal_warning)


def _not_signal_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")
