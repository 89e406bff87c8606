"""The Ray actor that is one rank: it reports where it landed, then runs Lightning entry points the driver sends."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Any

import ray

from raylane import _lightning, console, elastic, relay, storage, torch_distributed
from raylane.context import WorkerContext
from raylane.imported_code import ImportedCode
from raylane.payload import LaunchPayload
from raylane.process_state import ProcessDefaults
from raylane.registry import backend_host
from raylane.results import WorkerOutput, collect_output
from raylane.topology import WorkerPlacement

# When this process finished importing torch, Lightning and raylane: the bulk of an actor's start-up.
_IMPORTED_AT = time.time()
STACK_FRAMES = 12  # the innermost frames of a stuck rank's stack: where it is, not how Lightning got there


class Worker:
    """One rank's process. Threaded (two threads): one runs the entry point, the other answers relay polls."""

    def __init__(self, rank: int) -> None:
        self._rank = rank
        self._outbox = relay.Outbox()
        self._rendezvous: Any = None  # rank 0's torch.distributed store (see open_rendezvous)
        self._entry_thread: int | None = None  # the thread running the current entry point (see stack)
        self._defaults = ProcessDefaults.capture()  # what every entry point starts from (see run)
        self._code = ImportedCode.since_now()  # what entry points import here, and whether it changed since
        # Wall-clock marks of this worker's start-up, returned with each output (see WorkerOutput.marks).
        self._marks = {"imports_done": _IMPORTED_AT, "actor_ready": time.time()}
        self._ran_entry_point = False

    def __repr__(self) -> str:
        # Ray prefixes this actor's log lines with its repr: "(raylane rank 1 pid=...)".
        return f"raylane rank {self._rank}"

    def describe(self) -> WorkerPlacement:
        runtime = ray.get_runtime_context()
        return WorkerPlacement(
            node_id=runtime.get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            gpu_ids=tuple(str(gpu) for gpu in ray.get_gpu_ids()),
        )

    def pid(self) -> int:
        return os.getpid()

    def preload(self, modules: list[str]) -> None:
        """Import ``modules`` (the driver's Lightning) now, while the driver is still busy before its first entry
        point: loading the entry point's payload would import them otherwise (raylane.warm_start)."""
        import importlib

        for module in modules:
            importlib.import_module(module)
        # What importing them set (Lightning sets environment variables) belongs to the process's defaults, as it
        # does in a worker process Ray started with them preloaded.
        self._defaults = ProcessDefaults.capture()

    def request_resize(self) -> None:
        """Stop the running fit at its next epoch end, checkpointed, so the driver restarts it with more workers."""
        elastic.request_resize()

    def open_rendezvous(self, timeout_s: float) -> int:
        """Serve a fresh torch.distributed store on a port the OS picks; return the port.

        The store listens before any rank learns its port, so no other process can take the port in between (a port
        found free and handed out later can be, on a busy node). Every rank, this one included, connects to it as a
        client (``TORCHELASTIC_USE_AGENT_STORE``, see :func:`raylane.environment.rank_env`). It lives until the next
        entry point opens another, or the actor ends.
        """
        from datetime import timedelta

        from torch.distributed import TCPStore

        self._rendezvous = None  # the previous entry point's store stops listening first
        self._rendezvous = TCPStore(
            ray.util.get_node_ip_address(),
            0,
            None,
            True,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        return int(self._rendezvous.port)

    def changed_code(self) -> list[str]:
        """Source files that entry points imported here and that changed since: a worker still running their old code
        is not reused (:mod:`raylane.imported_code`)."""
        return self._code.changed()

    def drain_relay(self) -> list[tuple[str, Any]]:
        return self._outbox.drain()

    def stack(self) -> str:
        """Where the running entry point is now: its thread's Python stack, for a rank its peers waited for in vain."""
        frame = sys._current_frames().get(self._entry_thread) if self._entry_thread is not None else None
        return "".join(traceback.format_stack(frame, limit=STACK_FRAMES)) if frame is not None else ""

    def check_storage(self, context: WorkerContext, targets: storage.StorageTargets) -> None:
        """Whether this rank can use the run's remote URLs, with the workers' environment and packages; before the
        Trainer is unpickled here, which already needs the URLs' filesystem packages."""
        os.environ.update(context.env)
        storage.check_targets(targets)

    def run(self, context: WorkerContext, payload_ref: list[ray.ObjectRef]) -> WorkerOutput:
        """Run one entry point. The payload arrives as a nested reference so it is unpickled only after sys.path and
        the environment are ready (the user's modules may live next to the driver's script)."""
        marks = {**self._marks, "run_started": time.time()}
        self._entry_thread = threading.get_ident()
        self._marks = {}  # the actor's own start-up counts once, for its first entry point
        # Nothing an earlier entry point (maybe another Trainer's) changed reaches this one.
        self._defaults.restore(after_an_entry_point=self._ran_entry_point)
        self._ran_entry_point = True
        os.environ.update(context.env)
        for path in reversed(context.driver_sys_path):
            if path not in sys.path and os.path.isdir(path):
                sys.path.insert(0, path)
        marks["payload_requested"] = time.time()
        ray.wait(payload_ref, fetch_local=True)  # fetched, then unpickled: the marks tell the network from the imports
        marks["payload_fetched"] = time.time()
        payload: LaunchPayload = ray.get(payload_ref[0])
        marks["payload_loaded"] = time.time()
        self._code.record()  # the user's modules the payload names, as they were when imported
        payload.global_state.restore()
        if context.options.init_hook is not None:
            context.options.init_hook()
        if context.uses_gpu:
            import torch

            torch.cuda.set_device(torch.device(context.device))
        host = backend_host(context.backend)
        host.setup_process_group(context)
        torch_distributed.record_backend_group()
        marks["process_group_up"] = time.time()
        relay.activate(self._outbox if context.global_rank == 0 else None)
        try:
            payload.trainer.strategy.adopt_worker_context(context)  # type: ignore[attr-defined]
            elastic.prepare_worker(payload.trainer, context)
            with console.worker_console(context.global_rank):
                results = _run_entry_point(payload)
            output = collect_output(payload.trainer, results, context, host)
            output.marks = {**marks, "output_collected": time.time()}
            return output
        finally:
            relay.activate(None)
            host.teardown_process_group(context)
            self._code.record()  # what the entry point imported on the way


def _run_entry_point(payload: LaunchPayload) -> Any:
    try:
        return payload.function(*payload.args, **payload.kwargs)
    except _lightning.tuner_exit(payload.trainer):
        # Tuner(trainer).lr_find ends its fit on purpose once the search is done: finish as Lightning's own entry
        # point does, so that what the search found goes back to the driver with the rest.
        _lightning.finish_after_tuner_exit(payload.trainer)
        return None
