"""The local Ray of a script that does not connect to a cluster: started in the background as soon as the script
imports raylane (:func:`start_at_import`), else when it builds a raylane Trainer (or by
:func:`start_ray_in_background`), so it comes up while the script goes on importing Lightning and loading its data;
and stopped quickly when the script exits.

Starting early is the default only where it cannot surprise anyone (:func:`early_start_blocked`): in the main process
of a script that connects to no cluster (no ``RAY_ADDRESS``), runs no Ray yet, and does not call ``ray.init`` itself;
never inside Ray's own worker processes (they import raylane when they load a Trainer), in a child process, or under
pytest (whose fixtures start Ray themselves). Starting at import asks more (:mod:`raylane.main_script`): a script file
of the user's (not a notebook, a REPL, an installed command, one rank of another launcher) that does not import Ray;
and a ``ray.init`` call that raylane could not see coming still gets the Ray it asks for (:func:`_give_way_to`).
``RAYLANE_EARLY_START=0`` turns both off.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

from raylane import _ray, main_script, ray_address

log = logging.getLogger(__name__)

# What every worker actor imports before it can run anything; the Lightning namespace the driver uses is added.
WORKER_MODULES = ("raylane.worker",)
LIGHTNING_NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
EARLY_START_ENV = "RAYLANE_EARLY_START"
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


class _BackgroundStart:
    """``ray.init`` on a thread of its own, which then stays alive: Ray's processes are started with a parent-death
    signal tied to the starting thread, so they would be killed if the thread ended."""

    def __init__(self, num_cpus: int, preload_modules: list[str]) -> None:
        atexit.register(_stop_at_exit)  # an exit before Ray is up waits for it, then stops it
        self.num_cpus = num_cpus
        self._ready = threading.Event()
        self._stopped = threading.Event()
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
            self._stopped.wait()

    def wait(self) -> None:
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"starting Ray in the background failed: {self._error}") from self._error

    def wait_quietly(self) -> None:
        self._ready.wait()

    def stop(self) -> None:
        """Stop the Ray this started, once it is up (``ray.init`` cannot be stopped half way), and end the thread."""
        global _ray_is_ours
        self._ready.wait()
        if self._error is None and ray.is_initialized():
            _ray.stop_ray(flush_logs=False)  # only for a Ray no worker of raylane's ran on
            _ray_is_ours = False
        self._stopped.set()


_background: _BackgroundStart | None = None
_ray_is_ours = False  # raylane started the Ray this process runs, and has not stopped it
_winding_up: list[Callable[[], None]] = []
# The Ray started at import, until a Trainer or the script's own Ray call takes it: sized for this machine, not for a
# Trainer, and not yet asked for by anyone.
_import_start: _BackgroundStart | None = None
_started_at_import = False


def start_ray_in_background(num_cpus: int | None = None, preload: bool = False) -> None:
    """Start a local Ray now, without waiting for it: the script's next lines (imports, loading data, building the
    model) run while Ray comes up, and the first ``trainer.fit()`` waits only for what is left. Call it right after
    ``import raylane``, before importing Lightning and loading data, so there is something to overlap.

    ``import raylane`` does this by itself in a training script that leaves Ray to raylane, and building a raylane
    Trainer does it (with ``preload=True``) where that is safe (see the module's docstring). Call this where neither
    applies (a notebook, a script that imports Ray), or to choose the CPU count or the preload: a Ray started at
    import that differs is replaced.

    With ``preload=True`` Ray's worker processes import torch, Lightning and raylane as they start, so the workers'
    first entry point does not import them. Every Python worker Ray starts in this session then imports them too.
    ``num_cpus`` defaults to this machine's CPU count. Does nothing when Ray is already running, when ``RAY_ADDRESS``
    names a cluster, or when called twice.
    """
    global _background
    started = _claim_import_start()  # the script says what Ray it wants now
    if started is not None and (preload or (num_cpus or started.num_cpus) != started.num_cpus):
        _stop_background(started)
    if _ray_running_or_elsewhere():
        return
    # Worked out here, not on the thread: looking for a package can import it, and two threads importing the same
    # packages at once can deadlock.
    _background = _BackgroundStart(num_cpus or os.cpu_count() or 1, preload_modules() if preload else [])


def start_at_import() -> None:
    """``import raylane`` in a training script that leaves Ray to raylane starts the local Ray now, in the background,
    sized for this machine: it comes up while the script imports Lightning and builds its data and model. A Trainer
    that asks for more CPUs than that gets a Ray restarted with enough (:func:`_take_import_start`)."""
    global _background, _import_start, _started_at_import
    if import_start_blocked() is not None:
        return
    # No preload: on a many-core machine every idle worker Ray prestarts would import torch and Lightning. The
    # Trainer's own workers start when it is built, and import them then (raylane.warm_start).
    _background = _import_start = _BackgroundStart(os.cpu_count() or 1, [])
    _started_at_import = True
    ray.init = _give_way_to(ray.init)


def started_at_import() -> bool:
    """Whether ``import raylane`` began starting the local Ray in this process (it may still be coming up, or may
    have given way to a ``ray.init`` call since)."""
    return _started_at_import


def import_start_blocked() -> str | None:
    """Why ``import raylane`` may not start Ray here, or None (see the module's docstring)."""
    if reason := early_start_blocked():
        return reason
    if _ray_running_or_elsewhere():
        return "Ray runs, is starting, or RAY_ADDRESS names a cluster"
    return main_script.why_not_a_training_script()


def _ray_running_or_elsewhere() -> bool:
    return _background is not None or ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def early_start_blocked() -> str | None:
    """Why nothing may start before the first entry point in this process (Ray, or the workers), or None.

    ``RAYLANE_EARLY_START=0`` always blocks; ``=1`` allows it under pytest too.
    """
    if switched_off(EARLY_START_ENV):
        return f"{EARLY_START_ENV}={os.environ[EARLY_START_ENV]}"
    setting = os.environ.get(EARLY_START_ENV, "").strip().lower()
    if multiprocessing.parent_process() is not None:
        return "a child process (multiprocessing) starts nothing of its own"
    if setting not in _ON and _under_pytest():
        return "under pytest, whose fixtures start Ray themselves"
    return None


def switched_off(variable: str) -> bool:
    """Whether the environment variable ``variable`` turns its feature off (``0``, ``false``, ``no``, ``off``)."""
    return os.environ.get(variable, "").strip().lower() in _OFF


def _under_pytest() -> bool:
    # pytest sets PYTEST_VERSION for its whole run; its subprocesses inherit it, so a script a test runs counts only
    # when it imports pytest too (raylane.testing does).
    return "_pytest" in sys.modules and "PYTEST_VERSION" in os.environ


def start_for_workers(cpus_needed: float) -> bool:
    """Whether a Trainer's workers may start now, before its first entry point (:mod:`raylane.warm_start`).

    They may when nothing blocks an early start and Ray runs in this process as a driver (not a Ray worker, not a
    Ray Client), or when raylane may start its local Ray: then it starts now, in the background, with the workers'
    imports preloaded. That is the Ray the first entry point would start (no ``RAY_ADDRESS``, none running), except in
    a script that calls ``ray.init`` itself: a Ray started before that call would make it fail.
    """
    global _background
    if early_start_blocked() is not None:
        return False
    if _background is not None:
        _take_import_start(cpus_needed)
        return True
    if ray.is_initialized():
        return _ray.is_driver()
    if os.environ.get("RAY_ADDRESS") or main_script.calls_ray_init():
        return False
    _background = _BackgroundStart(_cpus_for(cpus_needed), preload_modules())
    return True


def wait_for_background_start() -> None:
    """Wait for a background start begun here, if any; raise when it failed."""
    if _background is not None:
        _background.wait()


def wait_for_early_start_or_drop_it() -> None:
    """Wait for a background start; when it failed (Ray's 30 s limit for its raylet to register can pass on an
    overloaded machine, where the start competed with the script's own work), forget it: the caller then starts Ray as
    it would have without it, and a failure there is reported as Ray reports it."""
    global _background
    try:
        wait_for_background_start()
    except RuntimeError as failed:
        log.warning("raylane: %s; starting Ray again, now.", failed)
        _background = None


def ensure_ray(cpus_needed: float) -> None:
    """Connect to Ray, starting a local instance when none is running (the laptop case).

    A local instance gets at least the CPUs the workers ask for, so ``workers=4`` runs on a 2-core laptop
    (oversubscribed) instead of waiting forever. On a cluster (``RAY_ADDRESS`` set or ``ray.init`` called) nothing is
    started. A start begun in the background is waited for.
    """
    _take_import_start(cpus_needed)
    wait_for_early_start_or_drop_it()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray_address.connect()
        return
    _init_local(_cpus_for(cpus_needed), [])


def owns_running_ray() -> bool:
    """Whether the Ray this process runs is a local one raylane started here (not the script's own, not a cluster)."""
    return _ray_is_ours and ray.is_initialized()


def stop_own_ray() -> None:
    """Stop the local Ray raylane started in this process now, as at exit; nothing when :func:`owns_running_ray` is
    false. For a caller that needs a Ray of another size next (a test suite's helper)."""
    global _ray_is_ours
    if not owns_running_ray():
        return
    if _background is not None:
        _stop_background(_background)  # also ends the thread Ray's processes are tied to
    else:
        _ray.stop_ray()
    _ray_is_ours = False


def _take_import_start(cpus_needed: float) -> None:
    """A Trainer takes the Ray started at import. It has this machine's CPU count; a Trainer that asks for more
    (``workers=4`` on a 2-core laptop, oversubscribed on purpose) would wait forever on it, so it is restarted with
    enough, and with the workers' imports preloaded as a Trainer's own start would have them."""
    global _background
    started = _claim_import_start()
    needed = _cpus_for(cpus_needed)
    if started is not None and started is _background and started.num_cpus < needed:
        log.info("raylane: restarting the local Ray with %d CPUs (it started with %d)", needed, started.num_cpus)
        _stop_background(started)
        _background = _BackgroundStart(needed, preload_modules())


def _claim_import_start() -> _BackgroundStart | None:
    """The Ray started at import, now its caller's (a Trainer, or the script's own Ray call); ``ray.init`` is Ray's
    own again."""
    global _import_start
    started, _import_start = _import_start, None
    if started is not None:
        _restore_ray_init()
    return started


def _stop_background(started: _BackgroundStart) -> None:
    global _background
    started.stop()
    if _background is started:
        _background = None


def _give_way_to(init: Callable[..., Any]) -> Callable[..., Any]:
    """``ray.init``, first stopping the Ray that raylane started at import if nothing took it yet: the call comes from
    code raylane could not see (a module the script imports), and gets the Ray it asks for, as without raylane."""

    @functools.wraps(init)
    def init_after_giving_way(*args: Any, **kwargs: Any) -> Any:
        started = _claim_import_start()
        if started is not None:
            log.info("raylane: ray.init was called; stopping the Ray raylane started at import first")
            _stop_background(started)
        return init(*args, **kwargs)

    init_after_giving_way.raylane_gives_way_to = init  # type: ignore[attr-defined]
    return init_after_giving_way


def _restore_ray_init() -> None:
    ray.init = _unwrapped(ray.init)


def _unwrapped(init: Callable[..., Any]) -> Callable[..., Any]:
    return getattr(init, "raylane_gives_way_to", init)


def _cpus_for(cpus_needed: float) -> int:
    return max(os.cpu_count() or 1, int(-(-cpus_needed // 1)))


def _init_local(num_cpus: int, preload_modules: list[str]) -> None:
    global _ray_is_ours
    log.info("raylane: starting a local Ray instance with %d CPUs", num_cpus)
    system_config = {"preload_python_modules": preload_modules} if preload_modules else None
    with _quiet_signal_warning(), _ray.agent_port_of_its_own():
        # address="local": our own instance, even when `ray start` left another cluster's address on this machine.
        _unwrapped(ray.init)(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            _system_config=system_config,
        )
    _ray_is_ours = True
    # Registered after Ray's own exit hook, so it runs first (atexit is last in, first out); Ray's then finds nothing
    # left to do. (A background start also registered it when it began, for an exit before Ray is up.)
    atexit.register(_stop_at_exit)


def before_stopping_ray(wind_up: Callable[[], None]) -> None:
    """Call ``wind_up`` at exit before raylane stops the Ray it started: threads still using Ray must be done first,
    since a Ray call after ``ray.shutdown()`` ends the whole process with status 1."""
    _winding_up.append(wind_up)


def _stop_at_exit() -> None:
    """The script is exiting: let what still uses Ray wind up (:func:`before_stopping_ray`), wait for a start still
    under way, and stop the Ray raylane started without Ray's waits (:func:`raylane._ray.stop_ray`)."""
    global _ray_is_ours
    for wind_up in _winding_up:
        try:
            wind_up()
        except Exception:  # stopping Ray matters more
            log.debug("raylane: winding up before stopping Ray failed", exc_info=True)
    if _background is not None:
        _background.wait_quietly()
    if _ray_is_ours and ray.is_initialized():
        _ray.stop_ray(flush_logs=_import_start is None)  # no worker of raylane's ran on a Ray nothing took
    _ray_is_ours = False


def preload_modules() -> list[str]:
    """raylane's worker module and the Lightning the workers will unpickle: the one the driver imported, or, when it
    has imported none yet, whichever is installed."""
    return [*WORKER_MODULES, *lightning_modules()]


def lightning_modules() -> list[str]:
    """The Lightning namespace the driver imported, or, when it has imported none yet, whichever is installed."""
    imported = [name for name in LIGHTNING_NAMESPACES if name in sys.modules]
    return imported or [name for name in LIGHTNING_NAMESPACES if _installed(name)][:1]


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
