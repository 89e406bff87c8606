"""Workers that outlive their driver, so the next script on the same Ray finds torch and Lightning imported.

On a Ray that outlives the script (a workstation's ``ray start --head``, a cluster), a driver whose workers stop
leaves as many fresh workers behind on the same nodes, detached from its job: each imports torch, Lightning and
raylane, then waits to be claimed. The next driver's workers are claimed from this pool, on the nodes their placement
group's bundles landed on, instead of started; then they run as fresh ones would (:meth:`PoolWorker.claim`).

- A pool worker serves one driver, once: claimed, it runs that driver's entry points and ends with its group, killed
  when the group shuts down or by itself within :data:`WATCH_S` of its driver's job ending. No user code ever ran in
  it before, so nothing of one script reaches the next.
- It reserves nothing while it waits (0 CPUs: memory only), and once claimed it runs in the slot the claimer's
  placement group holds. It waits at most ``RAYLANE_WARM_POOL_TIMEOUT`` seconds (default 600) for a claim, then exits.
- Only where it would be what a fresh worker is: the same Python and versions of raylane, Ray, torch and Lightning,
  CPU workers with the backend's default actor options, no ``runtime_env`` for the job or the Trainer, a driver
  (not a Tune trial or a Ray Client) on a Ray it did not start.
- ``RAYLANE_WARM_POOL=0`` turns it off (nothing claimed, nothing left behind); ``reuse_workers=False`` keeps a
  Trainer out of it.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import sys
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raylane import _ray, local_ray
from raylane.errors import ConfigurationError
from raylane.options import LaunchOptions
from raylane.placement import WorkerReservation
from raylane.process_state import ProcessDefaults
from raylane.worker import Worker

if TYPE_CHECKING:
    from raylane.group import WorkerGroup

log = logging.getLogger(__name__)

NAMESPACE = "raylane-warm-pool"
SWITCH_ENV = "RAYLANE_WARM_POOL"
TIMEOUT_ENV = "RAYLANE_WARM_POOL_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
WATCH_S = 5.0  # how often a pool worker checks its deadline, or whether its claimer's job ended
CLAIM_TIMEOUT_S = 60.0  # a pool worker still importing answers its claim once done; a stuck one is killed
COUNT_TIMEOUT_S = 2.0
# The most pool workers one group leaves: Ray registers each named actor before .remote() returns (about 20 ms here),
# and a script usually leaves them at its exit; a larger group's other ranks start as usual next time.
MOST_LEFT = 64
# The actor options a pool worker is started with besides its own: a Trainer whose workers need others (GPUs, a
# runtime_env, a backend's extra options) starts its own.
_DEFAULT_ACTOR_OPTIONS = {"num_cpus", "num_gpus", "resources", "max_concurrency"}
_VERSIONED = ("ray", "torch", "pytorch-lightning", "lightning", "raylane")


class PoolWorker(Worker):
    """A worker waiting in the pool: its modules imported, no rank, no resources; :meth:`claim` succeeds once."""

    def __init__(self, modules: list[str], timeout_s: float, creator_sys_path: tuple[str, ...]) -> None:
        super().__init__(rank=-1)
        self.preload(modules)
        self._creator_sys_path = creator_sys_path
        self._lock = threading.Lock()
        self._claimer: str | None = None  # the job id of the driver that claimed it
        threading.Thread(target=self._watch, args=(timeout_s,), name="raylane-pool-watch", daemon=True).start()

    def __repr__(self) -> str:
        return "raylane warm pool worker" if self._claimer is None else super().__repr__()

    def is_waiting(self) -> bool:
        return self._claimer is None

    def claim(self, rank: int, job_id: str, cpus: float, driver_sys_path: tuple[str, ...]) -> bool:
        """Become rank ``rank`` of job ``job_id``'s group: what a fresh worker with ``cpus`` CPUs of that job would
        see. False when another driver claimed it first."""
        with self._lock:  # the watch exits holding it: a claim either precedes the exit or never happens
            if self._claimer is not None:
                return False
            self._claimer = job_id
        self._rank = rank
        threads = max(math.floor(cpus), 1)  # what Ray sets for a worker with this many CPUs
        os.environ.update(OMP_NUM_THREADS=str(threads), RAY_JOB_ID=job_id)
        torch.set_num_threads(threads)
        # The creating driver's folders (its script's) are not this driver's: its own come with each entry point.
        sys.path[:] = [path for path in sys.path if path in driver_sys_path or path not in self._creator_sys_path]
        _ray.route_logs_to_job(job_id, repr(self))
        self._defaults = ProcessDefaults.capture()
        now = time.time()
        self._marks = {"imports_done": now, "actor_ready": now, "claimed_from_pool": now}
        return True

    def _watch(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            time.sleep(max(0.0, min(WATCH_S, deadline - time.monotonic())) if self._claimer is None else WATCH_S)
            with self._lock:
                claimer = self._claimer
                if claimer is None and time.monotonic() >= deadline:
                    os._exit(0)  # unclaimed for timeout_s: the pool gives the memory back
            if claimer is not None and _ray.job_finished(claimer):
                os._exit(0)  # the claimer's driver is gone without shutting its group down (killed, say)


def enabled() -> bool:
    return not local_ray.switched_off(SWITCH_ENV)


def waiting_timeout() -> float:
    """How long a pool worker waits for a claim: ``RAYLANE_WARM_POOL_TIMEOUT`` seconds."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        timeout_s = float(raw)
    except ValueError:
        timeout_s = -1.0
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ConfigurationError(
            f"{TIMEOUT_ENV}={raw!r}: give the seconds a warm pool worker waits for the next script, a number above 0 "
            f"(or {SWITCH_ENV}=0 to keep no pool)."
        )
    return timeout_s


@functools.cache
def fingerprint() -> str:
    """What a pool worker must share with its claimer: the interpreter, and the versions (and raylane's source) the
    worker imported."""
    versions = []
    for distribution in _VERSIONED:
        try:
            versions.append(f"{distribution}={importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{distribution}=-")
    package = os.path.dirname(os.path.abspath(__file__))
    source = max(entry.stat().st_mtime_ns for entry in os.scandir(package) if entry.name.endswith(".py"))
    text = "\n".join([sys.executable, sys.version, *versions, str(source)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def why_fresh(options: LaunchOptions, actor_options: Mapping[str, Any]) -> str | None:
    """Why workers with these options cannot come from the pool, or None when they can (given a Ray that outlives
    this driver: see :func:`serves`)."""
    if not enabled():
        return f"{SWITCH_ENV}=0"
    if not options.reuse_workers:
        return "reuse_workers=False"
    if options.use_gpu or actor_options.get("num_gpus", 0):
        return "GPU workers see their GPUs only when Ray starts them"
    if options.runtime_env is not None:
        return "the Trainer's runtime_env"
    extra = sorted(set(actor_options) - _DEFAULT_ACTOR_OPTIONS)
    return f"the backend's actor options {', '.join(extra)}" if extra else None


def serves(options: LaunchOptions, actor_options: Mapping[str, Any]) -> bool:
    """Whether a pool worker would be what this driver starts for these options (see the module's docstring)."""
    if why_fresh(options, actor_options) is not None:
        return False
    if not ray.is_initialized() or not _ray.is_driver() or not _ray.outlives_this_driver():
        return False
    waiting_timeout()  # a bad setting fails here, where the user can fix it, not at exit
    return not ray.get_runtime_context().runtime_env


def claim(
    reservation: WorkerReservation, options: LaunchOptions, driver_sys_path: tuple[str, ...]
) -> dict[int, ray.actor.ActorHandle]:
    """Pool workers for the ranks whose bundles landed on a node where some wait: rank -> claimed worker."""
    try:
        node_of = ray.util.placement_group_table(reservation.placement_group)["bundles_to_node_id"]
        waiting = _pool_by_node()
        job_id = ray.get_runtime_context().get_job_id()
        wanted = {rank: node_of[index] for rank, index in enumerate(reservation.bundle_indices)}
    except Exception:
        log.debug("raylane: the warm pool could not be read", exc_info=True)
        return {}
    claimed: dict[int, ray.actor.ActorHandle] = {}
    while True:
        attempts = {}
        for rank, node in wanted.items():
            if rank not in claimed and waiting.get(node):
                actor = _handle(waiting[node].pop())
                if actor is not None:
                    attempts[rank] = (actor, actor.claim.remote(rank, job_id, options.cpus_per_worker, driver_sys_path))
        if not attempts:
            return claimed
        for rank, (actor, answer) in attempts.items():
            try:
                if ray.get(answer, timeout=CLAIM_TIMEOUT_S):
                    claimed[rank] = actor
            except ray.exceptions.GetTimeoutError:
                ray.kill(actor, no_restart=True)  # it may say yes later, to nobody
            except Exception:  # it left (expired, its node lost): try the next one
                log.debug("raylane: a warm pool worker did not answer its claim", exc_info=True)


def top_up(group: WorkerGroup) -> None:
    """Leave, on each node of ``group``'s workers, as many pool workers as it had there (those already waiting
    count; :data:`MOST_LEFT` in all). ``group`` is shutting down; the new workers start detached and import what it
    imported."""
    try:
        if not group.contexts or not serves(group.options, group.host.worker_actor_options(group.options, 0)):
            return
        wanted = Counter(placement.node_id for placement in group.placements)
        waiting = _waiting_counts(wanted)
        timeout_s, modules = waiting_timeout(), local_ray.preload_modules()
        sys_path = group.contexts[0].driver_sys_path
        pool_worker = ray.remote(PoolWorker)
        missing = [node for node, count in wanted.items() for _ in range(count - waiting.get(node, 0))]
        for node in missing[:MOST_LEFT]:
            pool_worker.options(
                name=f"{fingerprint()}:{node}:{uuid.uuid4().hex[:8]}",
                namespace=NAMESPACE,
                lifetime="detached",
                num_cpus=0,
                max_concurrency=2,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(modules, timeout_s, sys_path)
    except Exception:
        log.debug("raylane: could not leave workers in the warm pool", exc_info=True)


def pool_names() -> list[str]:
    """The names of this environment's pool workers in the cluster, waiting or claimed (``<fingerprint>:<node id>:
    <id>``, in :data:`NAMESPACE`)."""
    prefix = f"{fingerprint()}:"
    named = ray.util.list_named_actors(all_namespaces=True)
    return [actor["name"] for actor in named if actor["namespace"] == NAMESPACE and actor["name"].startswith(prefix)]


def _pool_by_node() -> dict[str, list[str]]:
    by_node: dict[str, list[str]] = {}
    for name in pool_names():
        by_node.setdefault(name.split(":")[1], []).append(name)
    return by_node


def _handle(name: str) -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:  # gone since the listing
        return None


def _waiting_counts(nodes: Mapping[str, int]) -> Counter[str]:
    """How many pool workers wait on each of ``nodes``; one still importing counts as waiting."""
    answers = {}
    for node, names in _pool_by_node().items():
        if node in nodes:
            for name in names:
                actor = _handle(name)
                if actor is not None:
                    answers[actor.is_waiting.remote()] = node
    ready, importing = ray.wait(list(answers), num_returns=len(answers), timeout=COUNT_TIMEOUT_S)
    counts = Counter(answers[ref] for ref in importing)
    for ref in ready:
        try:
            if ray.get(ref):
                counts[answers[ref]] += 1
        except Exception:  # it left meanwhile
            continue
    return counts


# The groups that may leave workers in the pool, shut down before the driver disconnects: at exit, before Ray's own
# exit hook (registered after ray.init, so it runs first), and when the script calls ray.shutdown() itself. A driver's
# idle workers are otherwise only killed with its job, and leave nothing behind.
_live_groups: weakref.WeakSet[WorkerGroup] = weakref.WeakSet()
_hooks_installed = False


def shut_down_before_leaving_ray(group: WorkerGroup) -> None:
    """Shut ``group`` down (leaving its pool workers) before this driver leaves Ray: at exit, or at ``ray.shutdown()``
    called by the script."""
    global _hooks_installed
    _live_groups.add(group)
    if not _hooks_installed:
        _hooks_installed = True
        atexit.register(_shut_down_live_groups)
        ray.shutdown = _groups_first(ray.shutdown)


def _groups_first(shutdown: Callable[..., Any]) -> Callable[..., Any]:
    """``ray.shutdown``, first shutting down the groups that leave pool workers, while the driver can still start
    them: Ray 2.60 has no hook that runs before it disconnects."""

    @functools.wraps(shutdown)
    def shutdown_after_raylane_groups(*args: Any, **kwargs: Any) -> Any:
        if _shut_down_live_groups():
            time.sleep(_ray.LOG_FLUSH_S)  # the workers' last log lines reach the console, as at exit
        return shutdown(*args, **kwargs)

    return shutdown_after_raylane_groups


def _shut_down_live_groups() -> bool:
    """Shut the live groups down; whether any still had workers."""
    had_workers = False
    for group in list(_live_groups):
        had_workers |= bool(group.actors)
        group.shutdown()
    return had_workers
