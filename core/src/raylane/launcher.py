"""Lightning's side of a raylane run: hand one entry point to the workers, bring the results back to the Trainer."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_info

from raylane import _lightning, _ray, console, dropped_trainers, elastic, local_ray, relay, shards, storage
from raylane.errors import ConfigurationError, ResourceError, WorkerError
from raylane.group import WorkerGroup
from raylane.idle import IdleWatch
from raylane.local_ray import ensure_ray
from raylane.payload import GlobalTorchState, LaunchPayload, put_payload
from raylane.predictions import merge_predictions
from raylane.registry import backend_host
from raylane.results import apply_output
from raylane.warm_start import WarmStart

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from raylane.host import BackendHost
    from raylane.options import LaunchOptions
    from raylane.strategy import RayStrategyMixin

log = logging.getLogger(__name__)

# Every launcher in this process, so a new run can release other Trainers' idle warm workers.
_LAUNCHERS: weakref.WeakSet[RayLauncher] = weakref.WeakSet()


class RayLauncher:
    """Runs each Trainer entry point (fit, validate, test, predict) on the strategy's Ray worker actors.

    Lightning's launcher interface in either namespace: each namespace's ``_Launcher`` registers it (raylane.strategy).

    The actors start with the first entry point and stay warm for the next ones (fit -> validate -> test -> predict
    pay start-up once). They are released when an entry point fails, after ``idle_timeout`` seconds without a next
    entry point, as soon as other work waits for the resources they hold (raylane.idle), or by
    ``strategy.release_workers()``. Once the Trainer is dropped, they wait under the same rules for this driver's next
    Trainer (raylane.dropped_trainers).
    """

    def __init__(self, strategy: RayStrategyMixin) -> None:
        _LAUNCHERS.add(self)
        self._strategy = strategy
        self._group: WorkerGroup | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()  # the idle watch's thread and the Trainer's thread both release
        self._busy = False
        # Its idle workers' watch, which a dropped launcher's finalizer reads too (raylane.dropped_trainers).
        self._idleness = dropped_trainers.Idleness()
        self.last_checkpoint: str | None = None  # newest checkpoint rank 0 saved, where a restart resumes from
        self.last_world_size: int | None = None  # the worker count of the latest run (elastic runs change it)
        self._run_options: LaunchOptions | None = None  # the strategy's options sized for the current attempt
        self._resized_from: str | None = None  # the checkpoint an elastic fit stopped at to grow (raylane.elastic)
        self._grown_to = 0  # the worker count a grow decision counted room for
        # Wall-clock marks (time.time()) of the last entry point, on the driver and on each rank: see benchmarks/.
        self.timeline: dict[str, Any] = {}
        self._warm_start: WarmStart | None = None  # workers started when the Trainer was built (raylane.warm_start)
        self._warm_finalizer: weakref.finalize | None = None
        self._take_warm_start(self._start_workers_early())

    @property
    def is_interactive_compatible(self) -> bool:
        return True  # nothing is forked; notebooks work

    def launch(self, function: Callable[..., Any], *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is None:
            raise ConfigurationError("raylane runs Trainer entry points only; call trainer.fit/validate/test/predict.")
        options = self._strategy.launch_options
        check_trainer_flags(trainer, options.workers)
        check_learning_rate_search(trainer, self._strategy)
        self._strategy.check_before_launch(trainer)
        streams_ray_data = shards.check_entry_point_data(args, kwargs)  # a bare ray.data.Dataset fails here
        ensure_ray(options.workers * options.cpus_per_worker)
        host = backend_host(self._strategy.backend_name)
        _fix_logger_versions(trainer)
        self.last_checkpoint = None  # a restart resumes from this entry point's checkpoints, never an earlier one's
        restarts = 0
        size = self._first_size(host, options)
        while True:
            try:
                result = self._launch_sized(host, options, size, trainer, function, args, kwargs, streams_ray_data)
                if self._resized_from is None:
                    return result
                old, size = self.last_world_size or size, elastic.planned_size(host, options, at_least=self._grown_to)
                log.warning(
                    "raylane: room for more workers stayed free for %g s (grow_after_s); restarting fit from %s, "
                    "world size %d -> %d (a resize, not counted against max_failures).",
                    options.grow_after_s,
                    self._resized_from,
                    old,
                    size,
                )
                args, kwargs = _lightning.with_ckpt_path(function, args, kwargs, self._resized_from)
                continue
            except WorkerError as failure:
                if trainer.state.fn != _lightning.FITTING or restarts >= options.max_failures:
                    raise
                if self.last_checkpoint is None:
                    raise type(failure)(  # the same class: WorkerError, or WorkerError(<the worker's own class>)
                        f"{failure}\nNot restarted (max_failures={options.max_failures}): no checkpoint was saved "
                        "before the failure. Add a ModelCheckpoint that saves every epoch (or more often).",
                        rank=failure.rank,
                        node_ip=failure.node_ip,
                        node_id=failure.node_id,
                    ) from failure
                restarts += 1
                old = self.last_world_size or size
                size = elastic.planned_size(host, options) if options.elastic else options.workers
                log.warning(
                    "raylane: worker rank %d failed; restarting fit from %s on fresh workers (restart %d of %d), "
                    "world size %d -> %d.",
                    failure.rank,
                    self.last_checkpoint,
                    restarts,
                    options.max_failures,
                    old,
                    size,
                )
                args, kwargs = _lightning.with_ckpt_path(function, args, kwargs, self.last_checkpoint)

    def _first_size(self, host: BackendHost, options: LaunchOptions) -> int:
        """An elastic run keeps the size of its warm workers, else takes as many as fit now (at least the fewest)."""
        if not options.elastic:
            return options.workers
        group = self._group
        assert options.min_workers is not None
        if group is not None and group.actors and options.min_workers <= group.options.workers <= options.workers:
            return group.options.workers
        return elastic.planned_size(host, options)

    def _launch_sized(
        self, host: BackendHost, options: LaunchOptions, size: int, trainer: pl.Trainer, *entry_point: Any
    ) -> Any:
        """One attempt on ``size`` workers. More than the fewest are waited for briefly only: when they are gone by
        now (another job took them), the attempt runs on ``min_workers``, waiting up to ``resource_timeout``."""
        self._resized_from, self._grown_to = None, 0
        run_options = options if size == options.workers and not options.elastic else options.sized(size)
        assert options.min_workers is not None
        if size > options.min_workers:
            brief = replace(run_options, resource_timeout=min(options.resource_timeout, elastic.BRIEF_WAIT_S))
            try:
                self._run_options = brief
                return self._launch_once(host, trainer, *entry_point)
            except ResourceError as busy:
                log.warning(
                    "raylane: %d workers no longer fit (%s); starting %d (min_workers).",
                    size,
                    str(busy).split(".")[0],
                    options.min_workers,
                )
            run_options = options.sized(options.min_workers)
        self._run_options = run_options
        return self._launch_once(host, trainer, *entry_point)

    def _launch_once(
        self,
        host: BackendHost,
        trainer: pl.Trainer,
        function: Callable[..., Any],
        args: Any,
        kwargs: Any,
        streams_ray_data: bool,
    ) -> Any:
        marks = {"launch": time.time()}
        # Ray Datasets are split afresh for each attempt; the payload holds the split until this entry point ends.
        predicting = trainer.state.fn == _lightning.PREDICTING
        data_args, data_kwargs = shards.split_for_workers(args, kwargs, self._options(), predicting)
        payload = put_payload(LaunchPayload(trainer, function, data_args, data_kwargs, GlobalTorchState.capture()))
        marks["payload_stored"] = time.time()
        with self._lock:
            self._busy = True
            self._idleness.end()
        try:
            group = self._warm_group(host)
            group.check_storage(storage.find_targets(trainer, _lightning.ckpt_path_of(function, args, kwargs)))
            grow_watch = self._watch_for_room(group, trainer)
            try:
                outputs = group.run(payload, lambda topic, data: self._on_message(host, trainer, topic, data))
            finally:
                if grow_watch is not None:
                    grow_watch.cancel()
            # A warm group's start() marks belong to an earlier entry point.
            marks.update({name: at for name, at in group.marks.items() if at >= marks["launch"]})
            marks["outputs_received"] = time.time()
        except BaseException:  # failures, Ctrl-C: nothing may keep running or stay reserved
            self._busy = False
            self.release()
            raise
        self._busy = False
        if self._resized_from is not None:  # stopped to grow: these workers make way for the bigger run
            self.release()
            return None
        self._watch_idle_workers()
        marks["workers_released_or_kept"] = time.time()
        rank_zero = outputs[0].rank_zero
        assert rank_zero is not None, "rank 0 always reports the trainer state"
        apply_output(trainer, rank_zero, host)
        marks["results_applied"] = time.time()
        self.timeline = {"driver": marks, "workers": [output.marks for output in outputs]}
        if trainer.state.fn == _lightning.PREDICTING and outputs[0].predictions is not None:
            reporting = [o for o in outputs if o.predictions is not None]  # see RayStrategyMixin.reports_predictions
            return merge_predictions(
                [o.predictions or [] for o in reporting],
                [o.batch_indices or [] for o in reporting],
                outputs[0].batch_sizes or [],
                in_dataset_order=not streams_ray_data,  # Ray Data shards have no sample indices
            )
        return rank_zero.results

    def _options(self) -> LaunchOptions:
        """The options of the current attempt: the strategy's, sized to this attempt's worker count."""
        return self._run_options if self._run_options is not None else self._strategy.launch_options

    def _warm_group(self, host: BackendHost) -> WorkerGroup:
        options = self._options()
        if self._group is not None and self._group.options.workers == options.workers and self._group.is_reusable():
            self.last_world_size = options.workers
            return self._group
        early = self._claim_early_workers(host.backend, options)
        self.release()
        others = [launcher for launcher in list(_LAUNCHERS) if launcher is not self]
        # The workers started when the Trainer was built; else a later Trainer of this driver trains on an earlier
        # one's idle workers when they look the same.
        group = (
            early
            or next((g for g in (other._hand_over_if_idle(host.backend, options) for other in others) if g), None)
            or dropped_trainers.take(host.backend, options)
        )
        if group is not None:
            group.serve(host, options, self._strategy.backend_options)
        else:
            # Warm workers never block new work: idle groups of this driver's other Trainers make room first.
            for launcher in others:
                launcher._release_if_idle("another Trainer of this driver starts workers")
            dropped_trainers.release_all("another Trainer of this driver starts workers")
            group = WorkerGroup(host, options, self._strategy.backend_options)
        self._group = group
        self._finalizer = weakref.finalize(self, dropped_trainers.keep_or_stop, group, self._idleness)
        started = bool(group.actors)
        if not started:
            group.start()
        self.last_world_size = options.workers
        _log_start(group, started and group is not early)
        return group

    def _start_workers_early(self) -> WarmStart | None:
        """Start this Trainer's workers now, while the script loads its data, unless an earlier Trainer's idle
        workers will serve it, or nothing may start early here (raylane.local_ray.start_for_workers)."""
        options = self._strategy.launch_options
        if options.elastic or options.idle_timeout <= 0:
            return None
        try:
            return self._early_workers(options)
        except Exception:  # a head start only: building the Trainer must not fail for it
            log.debug("raylane: could not start the workers early", exc_info=True)
            return None

    def _early_workers(self, options: LaunchOptions) -> WarmStart | None:
        host = backend_host(self._strategy.backend_name)
        if dropped_trainers.has_like(host.backend, options):
            return None  # a dropped Trainer's idle workers serve this one's first entry point (see _warm_group)
        for other in [launcher for launcher in list(_LAUNCHERS) if launcher is not self]:
            # Idle workers of an earlier Trainer, or the early workers of one not yet run (a re-run notebook cell's),
            # serve this one's first entry point (see _warm_group).
            if other._has_idle_workers_like(host.backend, options) or other._has_warm_start_like(host.backend, options):
                return None
        if not local_ray.start_for_workers(options.workers * options.cpus_per_worker):
            return None
        lightning = self._strategy.lightning
        preload = [lightning.__name__] if lightning is not None else []
        return WarmStart(host, options, self._strategy.backend_options, preload)

    def early_workers_ready(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` for the workers started when the Trainer was built; whether they are up and wait
        for the first entry point (for benchmarks and tests: ``fit`` waits for them by itself)."""
        warm = self._warm_start
        return warm is not None and warm.wait(timeout_s)

    def _take_warm_start(self, warm: WarmStart | None) -> None:
        if warm is not None:
            self._warm_start = warm
            self._warm_finalizer = weakref.finalize(self, dropped_trainers.keep_early_start, warm)

    def _has_warm_start_like(self, backend: str, options: LaunchOptions) -> bool:
        with self._lock:
            warm = self._warm_start
            return warm is not None and warm.serves(backend, options)

    def _give_up_warm_start(self, backend: str, options: LaunchOptions) -> WarmStart | None:
        """This launcher's unclaimed early workers, for another Trainer whose workers would look the same."""
        with self._lock:
            warm = self._warm_start
            if warm is None or not warm.serves(backend, options):
                return None
            if self._warm_finalizer is not None:
                self._warm_finalizer.detach()
            self._warm_start, self._warm_finalizer = None, None
            return warm

    def _claim_early_workers(self, backend: str, options: LaunchOptions) -> WorkerGroup | None:
        """The workers started when the Trainer was built, now this launcher's group; None when there are none or
        they no longer fit ``options``."""
        with self._lock:
            warm, self._warm_start = self._warm_start, None
            if self._warm_finalizer is not None:
                self._warm_finalizer.detach()
            self._warm_finalizer = None
        if warm is None:  # another Trainer's, not yet run (maybe dropped already), that started none for this one
            others = [launcher for launcher in list(_LAUNCHERS) if launcher is not self]
            warm = next((w for w in (other._give_up_warm_start(backend, options) for other in others) if w), None)
            warm = warm or dropped_trainers.take_early_start(backend, options)
        group = warm.claim() if warm is not None else None
        if group is not None and not group.serves(backend, options):
            group.shutdown()
            return None
        return group

    def _has_idle_workers_like(self, backend: str, options: LaunchOptions) -> bool:
        with self._lock:
            return self._idle_group_like(backend, options) is not None

    def _idle_group_like(self, backend: str, options: LaunchOptions) -> WorkerGroup | None:
        """This launcher's group when it is idle and its workers look like ``options``' would; the lock is held."""
        group = self._group
        if self._busy or group is None or not group.serves(backend, options):
            return None
        return group

    def _hand_over_if_idle(self, backend: str, options: LaunchOptions) -> WorkerGroup | None:
        """This launcher's idle workers, given up to a Trainer whose workers would look the same; else None."""
        with self._lock:  # atomic with this launcher's next entry point, as _release_if_idle
            group = self._idle_group_like(backend, options)
            if group is None:
                return None
            self._idleness.end()
            if self._finalizer is not None:
                self._finalizer.detach()  # the group now belongs to the new launcher, which shuts it down
            self._group, self._finalizer = None, None
        # Pinged after the lock: a frozen worker's ping takes seconds, and this launcher's own next entry point or
        # idle watch must not wait for it. A group that does not answer is of no use to either launcher.
        if group.is_reusable():
            return group
        group.shutdown()
        return None

    def release(self) -> None:
        """Stop the warm workers and free their resources now."""
        with self._lock:
            self._release_locked()

    def _release_if_idle(self, reason: str) -> None:
        with self._lock:  # atomic with the next entry point's claim, so a run never loses its workers mid-start
            if self._busy or (self._group is None and self._warm_start is None):
                return
            log.info("raylane: releasing the idle warm workers: %s.", reason)
            self._release_locked()

    def _release_locked(self) -> None:
        self._idleness.end()
        if self._warm_finalizer is not None:
            self._warm_finalizer.detach()  # released now, not kept for a later Trainer
        if self._warm_start is not None:
            self._warm_start.release()
        self._warm_start, self._warm_finalizer = None, None
        if self._finalizer is not None:
            self._finalizer.detach()  # released now, not kept for a later Trainer
        if self._group is not None:
            self._group.shutdown()
        self._group, self._finalizer = None, None

    def _watch_idle_workers(self) -> None:
        timeout = self._strategy.launch_options.idle_timeout
        group = self._group
        if timeout <= 0 or group is None or group.reservation is None:
            self.release()
            return
        reservation = group.reservation
        held = reservation.held_per_node([p.node_id for p in group.placements]) if reservation.owned else {}
        # A weak reference: a watching thread must not keep a dropped Trainer's workers alive.
        launcher = weakref.ref(self)
        watch = IdleWatch(lambda reason: _release_if_idle(launcher, reason), timeout, held)
        with self._lock:
            self._idleness.watch = watch
        watch.start()

    def _watch_for_room(self, group: WorkerGroup, trainer: pl.Trainer) -> elastic.GrowWatch | None:
        """While an elastic fit runs below its most workers: a watch that asks it to grow once room stays free."""
        options = self._strategy.launch_options
        size = group.options.workers
        if trainer.state.fn != _lightning.FITTING or not options.elastic or size >= options.workers:
            return None
        reservation = group.reservation
        if reservation is None or not reservation.owned:
            return None  # inside someone else's placement group (a Tune trial's), which cannot grow
        held = reservation.held_per_node([placement.node_id for placement in group.placements])
        rank_zero = group.actors[0]

        def grow(target: int) -> None:
            self._grown_to = target
            rank_zero.request_resize.remote()

        watch = elastic.GrowWatch(options, size, held, grow)
        watch.start()
        return watch

    def _on_message(self, host: BackendHost, trainer: pl.Trainer, topic: str, payload: Any) -> None:
        if topic == relay.CHECKPOINT_SAVED:
            self.last_checkpoint = payload
        elif topic == elastic.RESIZE_SAVED:
            self._resized_from = payload
        elif not console.show(topic, payload):
            host.relay_metrics(trainer, topic, payload)

    def kill(self, signum: Any) -> None:
        """Ctrl-C or SIGTERM on the driver: stop every worker and release their resources."""
        self.release()

    def __getstate__(self) -> dict[str, Any]:
        # The launcher travels inside the pickled Trainer; actor handles and the placement group stay on the driver.
        state = {**self.__dict__, "_group": None, "_finalizer": None, "_busy": False}
        state["_idleness"] = dropped_trainers.Idleness()
        state.update(_warm_start=None, _warm_finalizer=None)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())
        _LAUNCHERS.add(self)


def release_idle_workers(reason: str) -> None:
    """Stop every idle warm worker of this driver now: its Trainers' and those dropped Trainers left (a worker running
    an entry point is not idle and stays)."""
    for launcher in list(_LAUNCHERS):
        launcher._release_if_idle(reason)
    dropped_trainers.release_all(reason)


def _release_if_idle(launcher_ref: weakref.ref[RayLauncher], reason: str) -> None:
    launcher = launcher_ref()
    if launcher is not None:
        launcher._release_if_idle(reason)


def check_trainer_flags(trainer: pl.Trainer, workers: int) -> None:
    """Reject Trainer flags that contradict ``workers=``: with raylane, Ray decides processes and placement."""
    if trainer.num_nodes != 1:
        raise ConfigurationError(
            f"Trainer(num_nodes={trainer.num_nodes}) contradicts raylane, where Ray places the {workers} workers on "
            "nodes itself. Remove num_nodes and set workers= to the total number of processes."
        )
    # On a CPU driver devices="auto" means 1, so any other count was asked for. (A GPU driver's "auto" is its GPU
    # count, indistinguishable from an explicit one, so it is not checked there.)
    cpu = _lightning.namespace_of(trainer).accelerators.CPUAccelerator
    if isinstance(trainer.accelerator, cpu) and trainer.num_devices not in (1, workers):
        raise ConfigurationError(
            f"Trainer(devices={trainer.num_devices}) contradicts get_strategy(workers={workers}). "
            "With raylane, workers= sets the number of processes; remove devices= from the Trainer."
        )


def check_learning_rate_search(trainer: pl.Trainer, strategy: RayStrategyMixin) -> None:
    """Refuse a learning-rate search on a backend that cannot run one, saying why and what to do instead."""
    refusal = strategy.learning_rate_search_refusal
    if refusal is not None and _lightning.learning_rate_finders(trainer):
        raise ConfigurationError(
            f"Tuner.lr_find (Lightning's LearningRateFinder) cannot search on the {strategy.backend_name} backend: "
            f"{refusal} Search with the ddp backend, on the model or a smaller one of its kind, or set the learning "
            "rate yourself."
        )


def _fix_logger_versions(trainer: pl.Trainer) -> None:
    # Resolve each logger's version here, so rank 0 writes to the directory trainer.logger.log_dir shows on the driver.
    for logger in trainer.loggers:
        _ = logger.version


def _log_start(group: WorkerGroup, reused: bool) -> None:
    options = group.options
    per_node: dict[str, int] = {}
    for context in group.contexts:
        per_node[context.placement.node_ip] = per_node.get(context.placement.node_ip, 0) + 1
    nodes = len({context.placement.node_id for context in group.contexts})
    where = ", ".join(f"{ip}: {count}" for ip, count in per_node.items())
    devices = ", ".join(sorted({context.device for context in group.contexts}))
    dashboard = _ray.dashboard_url()
    rank_zero_info(
        f"raylane: {group.host.backend} backend, {options.workers} worker(s) on {nodes} node(s) ({where}), placement "
        f"{options.placement_strategy}; {options.cpus_per_worker:g} CPU and {options.gpus:g} GPU per worker, devices "
        f"{devices}{' (the idle workers of an earlier Trainer, reused)' if reused else ''}"
        f"{f' ({group.pooled} from the warm pool an earlier script left)' if group.pooled else ''}; "
        + (f"Ray dashboard {dashboard}" if dashboard else "no Ray dashboard")
    )
