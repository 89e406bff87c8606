"""A set of worker actors in one placement group: started together, watched together, released together.

Any worker that raises or dies fails the whole group at once: the others may be blocked in a collective that will
never complete, so every actor is killed and the placement group released before the error reaches the caller.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import ray
from lightning_utilities.core.rank_zero import rank_zero_info
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylane import _ray, culprit, warm_pool
from raylane.context import WorkerContext
from raylane.errors import StorageError, WorkerError, worker_error
from raylane.heartbeat import Heartbeat
from raylane.host import BackendHost
from raylane.options import LaunchOptions
from raylane.placement import WorkerReservation
from raylane.results import WorkerOutput, driver_filesystem_node
from raylane.storage import StorageTargets
from raylane.topology import WorkerPlacement, assign_ranks
from raylane.worker import Worker

log = logging.getLogger(__name__)

RELAY_POLL_S = 0.5
ROOT_CAUSE_GRACE_S = 3.0  # how long the ranks of an echoing error have to report a cause of their own
STACK_TIMEOUT_S = 5.0
MessageHandler = Callable[[str, Any], None]


class WorkerGroup:
    """The actors of one strategy's runs. Use :meth:`start`, then :meth:`run` any number of times, and always
    :meth:`shutdown` (it is a context manager)."""

    def __init__(
        self, host: BackendHost, options: LaunchOptions, backend_options: Mapping[str, Any] | None = None
    ) -> None:
        self.host = host
        self.options = options
        self.backend_options = dict(backend_options or {})
        self.run_id = uuid.uuid4().hex[:8]
        self.reservation: WorkerReservation | None = None
        self.actors: list[ray.actor.ActorHandle] = []
        self.placements: list[WorkerPlacement] = []
        self.contexts: list[WorkerContext] = []
        self._rendezvous_used = False  # whether a run has used the store the contexts point to
        self.pooled = 0  # how many of the actors came from the warm pool (raylane.warm_pool)
        self._uploaded_env: dict[str, Any] | None = None  # the runtime_env the actors started with, folders uploaded
        self.marks: dict[str, float] = {}  # driver-side wall-clock marks of start() and run(), for benchmarks

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def start(self) -> WorkerGroup:
        """Reserve resources, start the actors and work out every worker's ranks, device and environment."""
        self.marks["start"] = time.time()
        bundles = self.host.placement_bundles(self.options)
        if len(bundles) != self.options.workers:
            raise ValueError(
                f"backend {self.host.backend!r} returned {len(bundles)} bundles for {self.options.workers} workers"
            )
        self.reservation = self.host.reserve_workers(bundles, self.options, f"raylane-{self.run_id}")
        self.marks["placement_ready"] = time.time()
        worker_class = ray.remote(Worker)
        actor_launch_options = self._with_uploaded_code()
        pooled = self._claim_from_warm_pool()
        self.pooled = len(pooled)
        for rank, bundle_index in enumerate(self.reservation.bundle_indices):
            if rank in pooled:
                self.actors.append(pooled[rank])
                continue
            actor_options = self.host.worker_actor_options(actor_launch_options, bundle_index)
            actor_options.update(
                name=f"raylane:{self.host.backend}:{self.run_id}:rank-{rank}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.reservation.placement_group, placement_group_bundle_index=bundle_index
                ),
            )
            self.actors.append(worker_class.options(**actor_options).remote(rank))
        self.marks["actors_requested"] = time.time()
        self.placements = self._gather([actor.describe.remote() for actor in self.actors])
        self.marks["actors_alive"] = time.time()
        self._refresh_contexts()
        self.marks["contexts_ready"] = time.time()
        return self

    def _claim_from_warm_pool(self) -> dict[int, ray.actor.ActorHandle]:
        """Workers an earlier driver left on these bundles' nodes (:mod:`raylane.warm_pool`), by rank; the group
        leaves as many behind when it shuts down."""
        assert self.reservation is not None
        if not warm_pool.serves(self.options, self.host.worker_actor_options(self.options, 0)):
            return {}
        warm_pool.shut_down_before_leaving_ray(self)
        return warm_pool.claim(self.reservation, self.options, _driver_sys_path())

    def _with_uploaded_code(self) -> LaunchOptions:
        """The options the actor-option hooks see: ``runtime_env``'s local folders already uploaded, once for the
        whole group (zipping and hashing a project folder per worker would grow start-up with the worker count)."""
        if self.options.runtime_env is None:
            return self.options
        self._uploaded_env = _ray.upload_local_code(self.options.runtime_env)
        return replace(self.options, runtime_env=self._uploaded_env)

    def _refresh_contexts(self) -> None:
        # A fresh store for every run: nothing of the previous rendezvous can leak into this one.
        timeout_s = self.options.collective_timeout
        master_port = self._gather([self.actors[0].open_rendezvous.remote(timeout_s)])[0]
        self.contexts = self._contexts(self.placements, master_port)
        self._rendezvous_used = False

    def serve(self, host: BackendHost, options: LaunchOptions, backend_options: Mapping[str, Any]) -> None:
        """Serve another strategy's entry points from now on (a later Trainer of the same driver whose workers would
        look the same, see :meth:`LaunchOptions.same_workers`): its options, timeouts, environment and backend
        options, in fresh contexts with a fresh rendezvous."""
        self.host, self.options, self.backend_options = host, options, dict(backend_options)
        self._refresh_contexts()

    def serves(self, backend: str, options: LaunchOptions) -> bool:
        """Whether these actors are what a Trainer of ``backend`` with ``options`` would start
        (:meth:`LaunchOptions.same_workers`)."""
        return self.host.backend == backend and self.options.same_workers(options)

    def is_reusable(self) -> bool:
        """Whether every actor still answers and runs the code fresh ones would: no module it imported changed since
        (:mod:`raylane.imported_code`), and the ``runtime_env``'s local folders upload as they did for it."""
        if not self.actors:
            return False
        try:
            changed = ray.get([actor.changed_code.remote() for actor in self.actors], timeout=10)
        except Exception:  # dead actor, lost node or timeout: start a fresh group instead
            return False
        files = sorted({path for paths in changed for path in paths})
        if self._uploaded_folders_changed():
            files.append("the runtime_env's local folders")
        if files:
            named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            rank_zero_info(f"raylane: fresh workers: the idle ones run code that changed since ({named})")
        return not files

    def _uploaded_folders_changed(self) -> bool:
        """Whether the ``runtime_env``'s ``working_dir`` or ``py_modules`` now upload as other contents than the actors
        run (Ray names an upload by a hash of its contents; workers on other nodes import from that copy)."""
        if self._uploaded_env is None or self.options.runtime_env is None:
            return False
        return _ray.upload_local_code(self.options.runtime_env) != self._uploaded_env

    def _contexts(self, placements: Sequence[Any], master_port: int) -> list[WorkerContext]:
        ranks = assign_ranks(placements)
        devices = self.host.assign_devices(placements, self.options)
        driver_node_id = driver_filesystem_node()
        driver_sys_path = _driver_sys_path()
        contexts = []
        for placement_, rank, device in zip(placements, ranks, devices):
            context = WorkerContext(
                backend=self.host.backend,
                options=self.options,
                placement=placement_,
                ranks=rank,
                devices=device,
                master_addr=placements[0].node_ip,
                master_port=master_port,
                driver_node_id=driver_node_id,
                driver_cwd=os.getcwd(),
                driver_sys_path=driver_sys_path,
                backend_options=self.backend_options,
            )
            contexts.append(replace(context, env=self.host.worker_env(context)))
        return contexts

    def check_storage(self, targets: StorageTargets) -> None:
        """Rank 0 checks the remote checkpoint and log URLs (:mod:`raylane.storage`) before any entry point runs;
        a URL it cannot use raises its :class:`~raylane.errors.StorageError` here, the group stopped."""
        if not targets:
            return
        try:
            self._gather([self.actors[0].check_storage.remote(self.contexts[0], targets)])
        except WorkerError as failure:
            cause = getattr(failure.__cause__, "cause", None)
            if isinstance(cause, StorageError):
                raise cause from None
            raise

    def run(self, payload: ray.ObjectRef, on_message: MessageHandler | None = None) -> list[WorkerOutput]:
        """Run the payload on every worker; return their outputs in rank order, or raise the first failure."""
        if self._rendezvous_used:
            self._refresh_contexts()
        self._rendezvous_used = True
        self.marks["entry_point_sent"] = time.time()
        refs = [actor.run.remote(context, [payload]) for actor, context in zip(self.actors, self.contexts)]
        outputs = self._gather(refs, on_message, Heartbeat(self.actors, self.options.heartbeat_timeout))
        return sorted(outputs, key=lambda output: output.rank)

    def _gather(
        self,
        refs: list[ray.ObjectRef],
        on_message: MessageHandler | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> list[Any]:
        """``ray.get`` that fails as soon as any one ref fails or any worker falls silent, relaying rank 0's messages
        while it waits."""
        rank_of = {ref: index for index, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            # Everything that is ready by the poll, not one ref per pass: with a pass per ref, the heartbeat and the
            # relay poll would run once per worker while the outputs come back.
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=RELAY_POLL_S)
            try:
                results.update(zip((rank_of[ref] for ref in ready), ray.get(ready)))  # fetched in parallel
            except (RayTaskError, RayActorError):
                failed, err = self._first_failure(ready)
                if on_message is not None:
                    self._relay(on_message)  # what rank 0 said before the failure (e.g. its last checkpoint)
                others = [ref for ref in ready if ref != failed] + pending  # a peer's own error may be among them
                rank, cause, what = self._root_cause(rank_of, others, rank_of[failed], err)
                raise self._worker_error(rank, cause, what) from (cause if isinstance(cause, Exception) else err)
            silent = heartbeat.check() if heartbeat is not None else None
            if silent is not None:
                raise self._worker_error(
                    silent.rank,
                    f"It answered no ping for {silent.silent_s:.0f} s (heartbeat_timeout="
                    f"{self.options.heartbeat_timeout:g}): its process is frozen or its node unreachable.",
                    what="stopped answering",
                )
            if on_message is not None:
                self._relay(on_message)
        if on_message is not None:
            self._relay(on_message)
        return [results[index] for index in range(len(refs))]

    @staticmethod
    def _first_failure(refs: list[ray.ObjectRef]) -> tuple[ray.ObjectRef, RayTaskError | RayActorError]:
        """The first of ``refs`` that holds an error (one of them does), with its error."""
        for ref in refs:
            try:
                ray.get(ref)
            except (RayTaskError, RayActorError) as err:
                return ref, err
        raise AssertionError("ray.get raised for one of these refs, but none holds an error")

    def _root_cause(
        self, rank_of: dict[ray.ObjectRef, int], pending: list[ray.ObjectRef], rank: int, err: Exception
    ) -> tuple[int, Exception | str, str | None]:
        """When one rank dies, raises or never joins a collective, its peers soon raise errors that only echo it.
        Give the other ranks a moment to report, and blame the real culprit: the rank that died or raised an error
        of its own, else, when the peers timed out in a collective, the first rank still running."""
        if isinstance(err, RayActorError) or not pending or not culprit.echoes_a_peer(str(err)):
            return rank, err, None
        ready, still_running = ray.wait(pending, num_returns=len(pending), timeout=ROOT_CAUSE_GRACE_S)
        gave_up = [rank] if culprit.gave_up_waiting(str(err)) else []
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as death:
                return rank_of[ref], death, None
            except RayTaskError as own:
                if not culprit.echoes_a_peer(str(own)):
                    return rank_of[ref], own, None  # that rank's own error, which its peers' errors only echo
                if culprit.gave_up_waiting(str(own)):
                    gave_up.append(rank_of[ref])
        if gave_up and still_running:
            straggler = min(rank_of[ref] for ref in still_running)
            report = culprit.straggler_report(
                straggler, self.options.collective_timeout, sorted(gave_up), self._stack_of(straggler)
            )
            return straggler, f"{report}\n\nRank {rank}'s error:\n{err}", "never joined a collective"
        return rank, err, None

    def _stack_of(self, rank: int) -> str | None:
        try:
            return ray.get(self.actors[rank].stack.remote(), timeout=STACK_TIMEOUT_S) or None
        except (RayActorError, RayTaskError, ray.exceptions.GetTimeoutError):
            return None

    def _relay(self, on_message: MessageHandler) -> None:
        try:
            messages = ray.get(self.actors[0].drain_relay.remote(), timeout=30)
        except (RayActorError, RayTaskError, ray.exceptions.GetTimeoutError):
            return  # rank 0 is gone; its run() ref reports why
        for topic, payload in messages:
            on_message(topic, payload)

    def _worker_error(self, rank: int, err: Exception | str, what: str | None = None) -> WorkerError:
        context = self.contexts[rank] if rank < len(self.contexts) else None
        node_ip = context.placement.node_ip if context else "unknown"
        node_id = context.placement.node_id if context else "unknown"
        what = what or ("died" if isinstance(err, RayActorError) else "raised")
        self.shutdown(replenish=False)
        return worker_error(
            f"raylane worker rank {rank} on node {node_ip} (node id {node_id[:12]}) {what}; all workers were "
            f"stopped and their resources released.\n{err}",
            rank=rank,
            node_ip=node_ip,
            node_id=node_id,
            raised=getattr(err, "cause", None) if isinstance(err, RayTaskError) and what == "raised" else None,
        )

    def pids(self) -> list[int]:
        return list(ray.get([actor.pid.remote() for actor in self.actors]))

    def shutdown(self, replenish: bool = True) -> None:
        """Kill every actor and release the placement group. Safe to call more than once. Unless a worker failed
        (``replenish=False``), leave as many in the warm pool for the next driver, where there is one."""
        if not ray.is_initialized():  # ray.shutdown() took everything down already; asking Ray would restart it
            self.actors, self.reservation = [], None
            return
        had_workers = bool(self.actors)
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                log.debug("actor already gone", exc_info=True)
        self.actors = []
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None
        if had_workers and replenish:
            warm_pool.top_up(self)


def _driver_sys_path() -> tuple[str, ...]:
    return tuple(os.path.abspath(path or os.curdir) for path in sys.path)
