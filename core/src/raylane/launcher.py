"""Lightning's side of a raylane run: hand one entry point to the workers, bring the results back to the Trainer."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_info

from raylane import _lightning, _ray, console, relay, shards, storage
from raylane.errors import ConfigurationError, WorkerError
from raylane.group import WorkerGroup
from raylane.idle import IdleWatch
from raylane.local_ray import ensure_ray
from raylane.payload import GlobalTorchState, LaunchPayload, put_payload
from raylane.predictions import merge_predictions
from raylane.registry import backend_host
from raylane.results import apply_output

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
    entry point, as soon as other work waits for the resources they hold (raylane.idle), when the strategy (with its
    Trainer) is garbage collected, or by ``strategy.release_workers()``.
    """

    def __init__(self, strategy: RayStrategyMixin) -> None:
        _LAUNCHERS.add(self)
        self._strategy = strategy
        self._group: WorkerGroup | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()  # the idle watch's thread and the Trainer's thread both release
        self._busy = False
        self._idle_watch: IdleWatch | None = None
        self.last_checkpoint: str | None = None  # newest checkpoint rank 0 saved, where a restart resumes from
        # Wall-clock marks (time.time()) of the last entry point, on the driver and on each rank: see benchmarks/.
        self.timeline: dict[str, Any] = {}

    @property
    def is_interactive_compatible(self) -> bool:
        return True  # nothing is forked; notebooks work

    def launch(self, function: Callable[..., Any], *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is None:
            raise ConfigurationError("raylane runs Trainer entry points only; call trainer.fit/validate/test/predict.")
        options = self._strategy.launch_options
        check_trainer_flags(trainer, options.workers)
        self._strategy.check_before_launch(trainer)
        streams_ray_data = shards.check_entry_point_data(args, kwargs)  # a bare ray.data.Dataset fails here
        ensure_ray(options.workers * options.cpus_per_worker)
        host = backend_host(self._strategy.backend_name)
        _fix_logger_versions(trainer)
        self.last_checkpoint = None  # a restart resumes from this entry point's checkpoints, never an earlier one's
        restarts = 0
        while True:
            try:
                return self._launch_once(host, trainer, function, args, kwargs, streams_ray_data)
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
                log.warning(
                    "raylane: worker rank %d failed; restarting fit from %s on fresh workers (restart %d of %d).",
                    failure.rank,
                    self.last_checkpoint,
                    restarts,
                    options.max_failures,
                )
                args, kwargs = _lightning.with_ckpt_path(function, args, kwargs, self.last_checkpoint)

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
        data_args, data_kwargs = shards.split_for_workers(args, kwargs, self._strategy.launch_options, predicting)
        payload = put_payload(LaunchPayload(trainer, function, data_args, data_kwargs, GlobalTorchState.capture()))
        marks["payload_stored"] = time.time()
        with self._lock:
            self._busy = True
            if self._idle_watch is not None:
                self._idle_watch.cancel()
        try:
            group = self._warm_group(host)
            group.check_storage(storage.find_targets(trainer, _lightning.ckpt_path_of(function, args, kwargs)))
            outputs = group.run(payload, lambda topic, data: self._on_message(host, trainer, topic, data))
            # A warm group's start() marks belong to an earlier entry point.
            marks.update({name: at for name, at in group.marks.items() if at >= marks["launch"]})
            marks["outputs_received"] = time.time()
        except BaseException:  # failures, Ctrl-C: nothing may keep running or stay reserved
            self._busy = False
            self.release()
            raise
        self._busy = False
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

    def _warm_group(self, host: BackendHost) -> WorkerGroup:
        if self._group is not None and self._group.is_alive():
            return self._group
        self.release()
        options = self._strategy.launch_options
        others = [launcher for launcher in list(_LAUNCHERS) if launcher is not self]
        # A later Trainer of this driver trains on an earlier one's idle workers when they look the same.
        group = next((g for g in (other._hand_over_if_idle(host.backend, options) for other in others) if g), None)
        if group is not None:
            group.serve(host, options, self._strategy.backend_options)
        else:
            # Warm workers never block new work: idle groups of this driver's other Trainers make room first.
            for launcher in others:
                launcher._release_if_idle("another Trainer of this driver starts workers")
            group = WorkerGroup(host, options, self._strategy.backend_options)
        self._group = group
        self._finalizer = weakref.finalize(self, group.shutdown)
        reused = bool(group.actors)
        if not reused:
            group.start()
        _log_start(group, reused)
        return group

    def _hand_over_if_idle(self, backend: str, options: LaunchOptions) -> WorkerGroup | None:
        """This launcher's idle workers, given up to a Trainer whose workers would look the same; else None."""
        with self._lock:  # atomic with this launcher's next entry point, as _release_if_idle
            group = self._group
            if self._busy or group is None or group.host.backend != backend:
                return None
            if not group.options.same_workers(options) or not group.is_alive():
                return None
            if self._idle_watch is not None:
                self._idle_watch.cancel()
            if self._finalizer is not None:
                self._finalizer.detach()  # the group now belongs to the new launcher, which shuts it down
            self._group, self._finalizer, self._idle_watch = None, None, None
            return group

    def release(self) -> None:
        """Stop the warm workers and free their resources now."""
        with self._lock:
            self._release_locked()

    def _release_if_idle(self, reason: str) -> None:
        with self._lock:  # atomic with the next entry point's claim, so a run never loses its workers mid-start
            if self._busy or self._group is None:
                return
            log.info("raylane: releasing the idle warm workers: %s.", reason)
            self._release_locked()

    def _release_locked(self) -> None:
        if self._idle_watch is not None:
            self._idle_watch.cancel()
        if self._finalizer is not None:
            self._finalizer()  # runs group.shutdown once
        self._group, self._finalizer, self._idle_watch = None, None, None

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
            self._idle_watch = watch
        watch.start()

    def _on_message(self, host: BackendHost, trainer: pl.Trainer, topic: str, payload: Any) -> None:
        if topic == relay.CHECKPOINT_SAVED:
            self.last_checkpoint = payload
        elif not console.show(topic, payload):
            host.relay_metrics(trainer, topic, payload)

    def kill(self, signum: Any) -> None:
        """Ctrl-C or SIGTERM on the driver: stop every worker and release their resources."""
        self.release()

    def __getstate__(self) -> dict[str, Any]:
        # The launcher travels inside the pickled Trainer; actor handles and the placement group stay on the driver.
        state = {**self.__dict__, "_group": None, "_finalizer": None, "_idle_watch": None, "_busy": False}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())
        _LAUNCHERS.add(self)


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
        f"{devices}{' (the idle workers of an earlier Trainer, reused)' if reused else ''}; "
        + (f"Ray dashboard {dashboard}" if dashboard else "no Ray dashboard")
    )
