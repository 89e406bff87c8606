"""The Ray calls outside Ray's public API (raylane._ray) still answer. If a Ray release moves them, raylane keeps
working (warm workers then wait out idle_timeout; the start-up line omits the dashboard), and this test says what
to fix."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from raylane import _ray
from raylane.testing import ensure_local_ray, env_without_ray_address, free_port
from raylane.testing.ray_state import listening_tcp_ports


@pytest.mark.timeout(60)
def test_waiting_work_lists_a_pending_placement_group_and_each_nodes_free_resources() -> None:
    ensure_local_ray()
    waiting = _ray.waiting_work()
    assert waiting is not None, "Ray no longer answers ray.autoscaler.v2.sdk.get_cluster_status"
    node = ray.get_runtime_context().get_node_id()
    assert 0 <= waiting.free[node]["CPU"] <= ray.cluster_resources()["CPU"], waiting.free
    too_big = {"CPU": ray.cluster_resources()["CPU"] + 1}
    pending = placement_group([too_big])
    try:
        deadline = time.monotonic() + 20
        while too_big not in getattr(_ray.waiting_work(), "demands", []):
            assert time.monotonic() < deadline, f"a pending placement group never showed: {_ray.waiting_work()}"
            time.sleep(0.2)
    finally:
        remove_placement_group(pending)


DASHBOARD_SCRIPT = """
import sys
import ray
from raylane import _ray
ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=int(sys.argv[1]), log_to_driver=False)
print("DASHBOARD", _ray.dashboard_url())
"""


def printed_lines(script: str, prefixes: tuple[str, ...], *args: str) -> tuple[list[str], str]:
    """Run ``script`` in a fresh interpreter with no ``RAY_ADDRESS`` (a Ray of its own); the lines it printed that
    start with ``prefixes``, and its output for the failure message."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env_without_ray_address(),
        capture_output=True,
        text=True,
        timeout=100,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefixes)]
    return lines, done.stdout + done.stderr[-3000:]


def test_the_dashboard_function_raylane_calls_is_still_in_ray() -> None:
    # dashboard_url() turns any error into None (the start-up line then omits the dashboard), so only this import
    # notices when a Ray release moves the function.
    from ray._private.worker import get_dashboard_url

    assert callable(get_dashboard_url)


@pytest.mark.timeout(60)
def test_dashboard_url_is_none_without_a_dashboard() -> None:
    ensure_local_ray()  # started without a dashboard
    assert _ray.dashboard_url() is None


@pytest.mark.timeout(120)
def test_dashboard_url_is_the_http_address_of_a_running_dashboard() -> None:
    port = free_port()
    lines, output = printed_lines(DASHBOARD_SCRIPT, ("DASHBOARD ",), str(port))
    assert lines == [f"DASHBOARD http://127.0.0.1:{port}"], output


QUICK_STOP_SCRIPT = """
import ray
from ray._private import ray_constants, worker
from raylane import _ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
kinds = worker._global_node.all_processes
print("KINDS", ray_constants.PROCESS_TYPE_RAYLET in kinds, ray_constants.PROCESS_TYPE_GCS_SERVER in kinds)
pids = [info.process.pid for infos in kinds.values() for info in infos]
_ray.stop_ray()
def still_running(pid):  # a zombie has exited; Linux's /proc says which
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
running = [pid for pid in pids if still_running(pid)]
print("RUNNING", running, ray.is_initialized())
"""


@pytest.mark.timeout(120)
def test_the_quick_stop_finds_the_processes_of_the_ray_it_started_and_stops_them() -> None:
    # stop_ray() falls back to ray.shutdown() (with its waits) when Ray moves its node's process table, so only this
    # test notices; it runs in a fresh interpreter, with a Ray of its own.
    lines, output = printed_lines(QUICK_STOP_SCRIPT, ("KINDS ", "RUNNING "))
    assert lines == ["KINDS True True", "RUNNING [] False"], output


AGENT_PORT_SCRIPT = """
import time
import ray
from raylane import _ray, local_ray
from raylane.testing.ray_state import listening_tcp_ports

local_ray.start_ray_in_background(num_cpus=1)
local_ray.wait_for_background_start()
[node] = ray.nodes()
port = node["DashboardAgentListenPort"]
deadline = time.monotonic() + 20
while port not in listening_tcp_ports() and time.monotonic() < deadline:
    time.sleep(0.2)
print("AGENT", port != _ray.SHARED_AGENT_PORT, port in listening_tcp_ports())
"""


@contextmanager
def port_held(port: int) -> Iterator[None]:
    """``port`` held by a listening socket of this process, unless another process holds it already."""
    with socket.socket() as holder:
        try:
            holder.bind(("", port))
            holder.listen()
        except OSError:
            pass  # held already (another Ray's agent, say)
        yield


@pytest.mark.timeout(120)
def test_a_ray_raylane_starts_gives_its_dashboard_agent_a_port_no_other_ray_holds() -> None:
    # While another process holds Ray's default agent port (another Ray's agent), an agent started on it retried the
    # bind for 3.4 s, and ray.init waited for it all that time (raylane._ray.agent_port_of_its_own).
    with port_held(_ray.SHARED_AGENT_PORT):
        assert _ray.SHARED_AGENT_PORT in listening_tcp_ports()
        lines, output = printed_lines(AGENT_PORT_SCRIPT, ("AGENT ",))
    assert lines == ["AGENT True True"], output


@pytest.mark.timeout(60)
def test_a_ray_this_driver_started_is_one_the_warm_pool_knows_ends_with_it() -> None:
    # The warm pool (raylane.warm_pool) leaves workers only on a Ray that outlives the driver; on one this process
    # started, Ray's node object lists the processes it owns. (A connected driver's pool:
    # tests/test_cluster_launch_modes.py.)
    ensure_local_ray()
    from ray._private import worker as ray_worker

    assert ray_worker._global_node is not None and ray_worker._global_node.all_processes
    assert not _ray.outlives_this_driver()


@pytest.mark.timeout(60)
def test_the_job_table_a_claimed_pool_worker_watches_still_answers() -> None:
    # job_finished() turns any error into False (a claimed pool worker then lives until its group is shut down), so
    # this asks Ray's job table directly.
    ensure_local_ray()
    from ray._private.worker import global_worker

    jobs = global_worker.gcs_client.get_all_job_info(
        skip_submission_job_info_field=True, skip_is_running_tasks_field=True, timeout=10
    )
    ours = ray.get_runtime_context().get_job_id()
    assert {key.hex(): info.is_dead for key, info in jobs.items()}.get(ours) is False
    assert not _ray.job_finished(ours)


def test_the_log_prefixes_a_claimed_pool_worker_writes_are_the_ones_rays_log_monitor_reads() -> None:
    import inspect

    from ray._private import log_monitor, ray_constants

    source = inspect.getsource(log_monitor)
    for prefix in ("LOG_PREFIX_JOB_ID", "LOG_PREFIX_ACTOR_NAME"):
        assert f"ray_constants.{prefix}" in source, f"Ray's log monitor no longer reads {prefix}"
    assert (ray_constants.LOG_PREFIX_JOB_ID, ray_constants.LOG_PREFIX_ACTOR_NAME) == (":job_id:", ":actor_name:")
