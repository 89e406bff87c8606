"""The only Ray calls outside Ray's public API, kept here so a Ray release that moves them breaks one module.

Each lookup degrades to "Ray cannot say" (None) instead of failing a run; the upload of local code for ``runtime_env``
fails as ``ray.init`` would. ``core/tests/test_ray_internals.py`` (and the runtime_env tests in
``tests/test_user_environment.py``) fail loudly when a Ray release stops answering them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray

log = logging.getLogger(__name__)


def dashboard_url() -> str | None:
    """The Ray dashboard's address, or None when Ray runs without one.

    Ray's only public way to it is the return value of ``ray.init()``, which raylane does not see when the user
    connected; so this asks Ray's worker module.
    """
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # a Ray Client driver, a Ray that moved the function
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


@dataclass(frozen=True)
class WaitingWork:
    """What waits for resources in the cluster, and what each node has free for it."""

    demands: list[Mapping[str, float]]  # one resource bundle per waiting task, actor or placement-group bundle
    free: dict[str, Mapping[str, float]]  # node id (hex) -> its resources that nothing holds


def waiting_work() -> WaitingWork | None:
    """The resource bundles that tasks, actors and placement groups anywhere in the cluster wait for.

    This is what ``ray status`` shows under "Pending demands", read from the control store in a few milliseconds. None
    when Ray cannot say (a Ray Client driver, a Ray that changed the call).
    """
    if not ray.is_initialized():  # asking a shut-down Ray would start a new one
        return None
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
        waiting = [*status.resource_demands.ray_task_actor_demand, *status.resource_demands.placement_group_demand]
        demands = [dict(request.bundle) for demand in waiting for request in demand.bundles_by_count]
        nodes = [*status.active_nodes, *status.idle_nodes]
        return WaitingWork(demands, {node.node_id: node.available_resources() for node in nodes if node.node_id})
    except Exception:
        log.debug("Ray did not report its pending demands", exc_info=True)
        return None


def upload_local_code(runtime_env: Mapping[str, Any]) -> dict[str, Any]:
    """``runtime_env`` with its local ``working_dir`` and ``py_modules`` folders uploaded to Ray, named by URI.

    Ray uploads local folders only for a job's runtime_env (``ray.init``, ``ray job submit``) and rejects them in an
    actor's options; raylane's workers are actors, so the driver uploads them as ``ray.init`` would (content-hashed:
    an unchanged folder is not sent twice, but it is zipped and hashed on every call: call it once per worker group).
    A Ray Client driver's folders are left to Ray, which says what to do.
    """
    env = dict(runtime_env)
    if "working_dir" not in env and "py_modules" not in env:
        return env
    if ray.util.client.ray.is_connected():
        return env
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"  # Ray's own switch
    with tempfile.TemporaryDirectory() as scratch:
        env = upload_py_modules_if_needed(env, include_gitignore=include_gitignore, scratch_dir=scratch, logger=log)
        env = upload_working_dir_if_needed(env, include_gitignore=include_gitignore, scratch_dir=scratch, logger=log)
    env.pop("excludes", None)  # applied by the upload; not an actor option
    return env


def is_driver() -> bool:
    """Whether this process is connected to Ray as a driver (a script or notebook), not as one of Ray's worker
    processes (a task, an actor, a Tune trial) nor as a Ray Client."""
    if ray.util.client.ray.is_connected():
        return False
    try:
        from ray._private.worker import global_worker

        return bool(global_worker.mode == ray.SCRIPT_MODE)
    except Exception:  # a Ray that moved it: then start nothing early
        log.debug("Ray did not say whether this is a driver", exc_info=True)
        return False


def outlives_this_driver() -> bool:
    """Whether the Ray this driver uses goes on after it exits: one it connected to (``ray start``, a cluster), not
    one its own ``ray.init()`` started (whose processes this one owns and stops at exit)."""
    try:
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        return node is not None and not node.all_processes
    except Exception:  # a Ray that moved it: assume the Ray ends with the driver
        log.debug("Ray did not say whether it outlives this driver", exc_info=True)
        return False


def job_finished(job_id: str) -> bool:
    """Whether the job ``job_id`` (hex) has ended: its driver exited or was killed. False when Ray cannot say."""
    try:
        from ray._private.worker import global_worker

        jobs = global_worker.gcs_client.get_all_job_info(
            skip_submission_job_info_field=True, skip_is_running_tasks_field=True, timeout=10
        )
        return any(info.is_dead for key, info in jobs.items() if key.hex() == job_id)
    except Exception:
        log.debug("Ray did not say whether job %s ended", job_id, exc_info=True)
        return False


def route_logs_to_job(job_id: str, actor_name: str) -> None:
    """Send this worker process's later stdout and stderr lines to the driver of job ``job_id`` (hex), prefixed
    with ``actor_name``.

    Ray's log monitor streams a worker's lines to the driver of the job named by the last ``:job_id:`` line the worker
    wrote, under the name of the last ``:actor_name:`` line; a process started for one job and then serving another
    (a warm pool worker) names its new job, and its new name, this way.
    """
    from ray._private import ray_constants

    for stream in (sys.stdout, sys.stderr):
        print(f"{ray_constants.LOG_PREFIX_JOB_ID}{job_id}", file=stream, flush=True)
        print(f"{ray_constants.LOG_PREFIX_ACTOR_NAME}{actor_name}", file=stream, flush=True)


# The port Ray gives every node's dashboard agent HTTP server unless told otherwise (``ray start
# --dashboard-agent-listen-port``; ``ray.init`` has no such argument).
SHARED_AGENT_PORT = 52365


@contextmanager
def agent_port_of_its_own() -> Iterator[None]:
    """Within it, a local Ray that ``ray.init`` starts gives its dashboard agent a free port instead of
    :data:`SHARED_AGENT_PORT`.

    While another Ray on this machine holds that port (a workstation's ``ray start --head``, a notebook's Ray, or the
    agent of a Ray that ``ray.shutdown()`` stopped, which lingers for about a minute), the new agent retries the bind
    for 3.4 s, then gives up; the raylet waits for it all that time before it registers, so ``ray.init`` took 3.4 s
    longer. Nothing uses that HTTP server on a Ray started for one script (it serves Ray Jobs, which needs the full
    dashboard). Ray's own ``cluster_utils`` moves the port of every node but the first for the same reason.
    """
    try:
        from ray._private.parameter import RayParams

        movable = "dashboard_agent_listen_port" in inspect.signature(RayParams.__init__).parameters
    except Exception:  # a Ray that moved it
        movable = False
    if not movable:  # the default port, and the wait when another Ray holds it
        log.debug("Ray's node parameters changed; its dashboard agent keeps the default port")
        yield
        return
    original = RayParams.__init__
    port = _free_port()

    @functools.wraps(original)
    def with_free_agent_port(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    RayParams.__init__ = with_free_agent_port  # type: ignore[method-assign]
    try:
        yield
    finally:
        RayParams.__init__ = original  # type: ignore[method-assign]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


LOG_FLUSH_S = 0.5  # what Ray's exit hook, too, gives the workers' last log lines to reach the driver
CORE_GRACE_S = 1.0  # what Ray gives its raylet after SIGTERM before it kills it
OTHERS_GRACE_S = 0.2  # the log monitor and the dashboard's processes exit within milliseconds of SIGTERM


def stop_ray(flush_logs: bool = True) -> None:
    """``ray.shutdown()`` without its waits, for a script that is exiting.

    Ray's exit hook sleeps half a second (for log lines still in flight), then stops the processes it started one at
    a time, giving each up to a second after SIGTERM. Here the autoscaler monitor is killed at once (it carries no
    logs, and ignores SIGTERM for that second); the same half second lets the workers' last prints reach the driver
    (without it they were lost; ``flush_logs=False`` when no worker ever ran); the driver disconnects as
    ``ray.shutdown()`` does it; the raylet gets SIGTERM (it stops its worker processes, within milliseconds once
    the driver is gone); then the GCS is killed (once its raylet is gone it holds nothing anyone needs, and it
    sometimes waits a second or more before it heeds SIGTERM) and the rest get SIGTERM, then SIGKILL after
    :data:`OTHERS_GRACE_S`. A Ray this process only connected to has none of its processes here: it is only
    disconnected.
    """
    try:
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        processes = {
            kind: [info.process for info in infos] for kind, infos in (node.all_processes if node else {}).items()
        }
        raylet = processes.pop(ray_constants.PROCESS_TYPE_RAYLET, [])
        monitor = processes.pop(ray_constants.PROCESS_TYPE_MONITOR, [])
        gcs = processes.pop(ray_constants.PROCESS_TYPE_GCS_SERVER, [])
        ray_worker._global_node = None  # ray.shutdown() below then only disconnects
    except Exception:  # a Ray that moved them: its own shutdown, with its waits
        log.debug("stopping Ray the quick way failed; using ray.shutdown()", exc_info=True)
        ray.shutdown()
        return
    try:
        _kill(monitor)
        if flush_logs:
            time.sleep(LOG_FLUSH_S)
        ray.shutdown()
        if node is not None and node.is_head():
            node.destroy_external_storage()  # objects spilled to disk, as ray.shutdown() removes them
    finally:
        _stop_processes(raylet, CORE_GRACE_S)
        _kill(gcs)
        _stop_processes([process for rest in processes.values() for process in rest], OTHERS_GRACE_S)


def _kill(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        _reap(process)


def _stop_processes(processes: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM to each, then SIGKILL to those still running after ``grace_s`` (one deadline for all)."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            _reap(process)


def _reap(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=CORE_GRACE_S)
    except subprocess.TimeoutExpired:  # stuck in the kernel; init reaps it once it dies
        log.debug("Ray process %d did not die on SIGKILL", process.pid)
