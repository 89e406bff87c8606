"""The three ways Ray users run a training script on a cluster, each against a real ``ray start --head``.

1. On the head node: ``ray.init(address="auto")`` with ``RAY_ADDRESS`` naming the cluster.
2. Ray Jobs: ``ray job submit --working-dir ... -- python train.py`` through the dashboard's job server.
3. Ray Client: ``ray.init("ray://host:port")`` from a process that is no Ray node; or ``RAY_ADDRESS=ray://host:port``
   and raylane connects, again when the head loses the server it started for the client (a Ray bug, made to happen
   here through the head's ``sitecustomize``).

Then the warm pool (:mod:`raylane.warm_pool`) between scripts run one after another on the same head
(tests/warm_pool_driver.py); the other drivers run with it off, so that no test sees another's pool workers.

One head per module (4 CPUs, its own temp dir and ports, token auth off so no machine-wide token is needed), started
in the directory ``head/`` so its workers resolve relative paths elsewhere than the drivers do. The script
(tests/cluster_driver.py) logs with ``CSVLogger("logs")`` and checkpoints under it: weights, metrics and those files
must all be where the driver looks for them. The same script then fits and predicts on Ray Datasets (``from_ray``), so
each mode also checks that the split made from its driver reaches the workers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from raylane import ray_address, warm_pool
from raylane.testing import env_without_ray_address, free_port, printed_report, python_path_running_at_startup
from tests import warm_pool_driver, warm_pool_waiting
from tests.cluster_driver import FIT_ONLY, RESULT_PREFIX

pytestmark = pytest.mark.timeout(240)

DRIVER_SCRIPT = Path(__file__).with_name("cluster_driver.py")
POOL_DRIVER = Path(warm_pool_driver.__file__)
POOL_WAITING = Path(warm_pool_waiting.__file__)
STOP_GRACE_S = 3  # Ray's processes stop within milliseconds of SIGTERM; `ray start --block` itself takes seconds
POOL_WAIT_S = 90  # the pool workers a script leaves import torch and Lightning first
HEAD_START_TIMEOUT = 90
DRIVER_TIMEOUT = 180
# A server the head loses costs its client up to a minute on a loaded machine here: the head's channel wait (10 s, set
# below), the client's reconnect grace period, and the next start.
LOST_SERVER_COST_S = 60
RAY_CLIENT_TIMEOUT = DRIVER_TIMEOUT + (ray_address.CONNECT_ATTEMPTS - 1) * LOST_SERVER_COST_S
# The driver's own ray.init("ray://...") gets Ray's behaviour: a head can lose the server process Ray Client's proxy
# starts for it (ray-project/ray#63202), so the test connects again, as raylane does when it connects itself.
RAY_CLIENT_ATTEMPTS = ray_address.CONNECT_ATTEMPTS
# On the head's PYTHONPATH: a Ray Client server dies at start-up, as in ray-project/ray#63202, while the file that
# LOSE_CLIENT_SERVERS names holds a count above 0 (each death takes one off). Every other process goes on as usual.
LOSE_CLIENT_SERVERS = "RAYLANE_TEST_LOSE_CLIENT_SERVERS"
SITECUSTOMIZE = f"""
import os
import signal
from pathlib import Path

_count_file = Path(os.environ.get("{LOSE_CLIENT_SERVERS}", "/nonexistent"))
if _count_file.is_file() and b"--mode=specific-server" in Path("/proc/self/cmdline").read_bytes().split(b"\\0"):
    _left = int(_count_file.read_text() or 0)
    if _left > 0:
        _count_file.write_text(str(_left - 1))
        os.kill(os.getpid(), signal.SIGKILL)
"""
# ray start picks fixed default ports for these; free ones let the head share the machine with other Ray instances.
HEAD_PORT_OPTIONS = (
    "port",
    "ray-client-server-port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


@dataclass(frozen=True)
class Head:
    gcs_address: str
    dashboard_url: str
    client_address: str
    cwd: Path
    env: dict[str, str]
    lose_client_servers: Path  # how many Ray Client servers to come are to die at start-up (SITECUSTOMIZE)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop every process of this head (its own process group), never another Ray on the machine (no `ray stop`).
    All at once: `ray start --block` alone stops them one by one, with a grace period each."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever did not stop in time
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    ports = {option: free_port() for option in HEAD_PORT_OPTIONS}
    cwd = tmp_path_factory.mktemp("head")
    temp_dir = tempfile.mkdtemp(prefix="rlh", dir="/tmp")  # short: Ray's socket paths live under it
    env = env_without_ray_address()
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAYLANE_WARM_POOL"] = "0"  # the pool's tests turn it on for their own drivers
    env["PYTHONPATH"] = python_path_running_at_startup(SITECUSTOMIZE, cwd / "site", env.get("PYTHONPATH"))
    env[LOSE_CLIENT_SERVERS] = str(cwd / "lose_client_servers")
    # How long the head's Ray Client proxy waits for a client's server to answer before it fails that client's
    # ray.init (30 s by default; a server answers within a second here). A lost server costs its client this wait.
    env["RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S"] = "10"
    # docs/cluster.md's advice for a head: without it the head loses Ray Client servers by chance (grpc/grpc#43055;
    # the first of each head, and two in a row under load in CI), and the tests would depend on how many. The one loss
    # a test needs, it makes happen itself (SITECUSTOMIZE).
    env["GRPC_ENABLE_FORK_SUPPORT"] = "0"
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "4"]
    command += ["--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
    command += ["--temp-dir", temp_dir, "--disable-usage-stats"]
    command += [arg for option, port in ports.items() for arg in (f"--{option}", str(port))]
    log = cwd / "ray_start.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        dashboard_url = f"http://127.0.0.1:{ports['dashboard-port']}"
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while not (_answers(f"{dashboard_url}/api/version") and _accepts(ports["ray-client-server-port"])):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield Head(
            gcs_address=f"127.0.0.1:{ports['port']}",
            dashboard_url=dashboard_url,
            client_address=f"ray://127.0.0.1:{ports['ray-client-server-port']}",
            cwd=cwd,
            env=env,
            lose_client_servers=Path(env[LOSE_CLIENT_SERVERS]),
        )
    finally:
        _stop(process)
        _keep_logs(Path(temp_dir), cwd / "logs")
        shutil.rmtree(temp_dir, ignore_errors=True)


def _keep_logs(temp_dir: Path, destination: Path) -> None:
    """The head's own logs (Ray Client servers, job supervisor, raylet) outlive its temp dir, in pytest's tmp dirs."""
    for log in temp_dir.glob("session_*/logs/*"):
        if log.is_file() and log.suffix in (".err", ".out", ".log"):
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, destination / log.name)


def _run(
    command: list[str], cwd: Path, env: dict[str, str], timeout: float = DRIVER_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _result(output: str) -> dict[str, Any]:
    return printed_report(output, RESULT_PREFIX)


def _assert_trained(result: dict[str, Any], driver_cwd: Path, ray_data: bool = True) -> None:
    assert result["status"] == "finished" and result["epoch"] == 2 and result["global_step"] == 8
    assert result["weights_changed"], "the trained weights came back to the driver's model"
    assert {"train_loss", "val_loss"} <= set(result["metrics"])
    # Relative paths resolve against the driver's working directory, and the files are there.
    assert Path(result["checkpoint"]).is_relative_to(driver_cwd.resolve())
    assert result["checkpoint_holds_driver_weights"]
    assert Path(result["log_dir"]).is_relative_to(driver_cwd.resolve())
    assert result["metrics_csv_rows"] >= 3, "a header and a row per epoch"
    if not ray_data:
        assert "ray_data" not in result
        return
    ray_data = result["ray_data"]
    assert ray_data["global_step"] == 64 // (8 * 2), "each of the 2 ranks streamed its half of the 64 rows"
    assert {"train_loss", "val_loss"} <= set(ray_data["metrics"])
    assert ray_data["predicted_ids"] == list(range(45)), "predict returned every row exactly once"


def test_driver_on_the_head_node_connects_with_address_auto(head: Head, tmp_path: Path) -> None:
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    result = _result(_run([sys.executable, str(DRIVER_SCRIPT), "auto"], tmp_path, env).stdout)

    assert not result["ray_client"]
    _assert_trained(result, tmp_path)
    assert Path(result["checkpoint"]).is_file() and Path(result["log_dir"], "metrics.csv").is_file()


@pytest.mark.timeout(RAY_CLIENT_TIMEOUT + 60)
def test_ray_client_driver_gets_checkpoints_and_logs_on_its_own_filesystem(head: Head, tmp_path: Path) -> None:
    command = [sys.executable, str(DRIVER_SCRIPT), head.client_address]
    for attempt in range(1, RAY_CLIENT_ATTEMPTS + 1):
        try:
            output = _run(command, tmp_path, head.env).stdout
            break
        except AssertionError as failure:
            if attempt == RAY_CLIENT_ATTEMPTS or not ray_address.names_a_lost_client_server(str(failure)):
                raise
    result = _result(output)

    assert result["ray_client"]
    _assert_trained(result, tmp_path)
    # On the client's side: here the same machine, but another directory than the workers' (the head's).
    assert Path(result["checkpoint"]).is_file() and Path(result["log_dir"], "metrics.csv").is_file()


@pytest.mark.timeout(RAY_CLIENT_TIMEOUT + 60)
def test_raylane_connecting_through_a_ray_client_address_connects_again_when_the_head_loses_its_server(
    head: Head, tmp_path: Path
) -> None:
    """``RAY_ADDRESS=ray://...`` and no ``ray.init`` in the script: raylane connects, and connects again when the
    server process the head started for it dies at start-up (ray-project/ray#63202, made to happen here)."""
    head.lose_client_servers.write_text("1")
    # After a failed connection Ray Client waits out its reconnect grace period (30 s by default) before ray.init
    # raises; a shorter one keeps this test short and changes nothing raylane does.
    env = {**head.env, "RAY_ADDRESS": head.client_address, "RAY_CLIENT_RECONNECT_GRACE_PERIOD": "5"}
    try:
        done = _run([sys.executable, str(DRIVER_SCRIPT), FIT_ONLY], tmp_path, env, RAY_CLIENT_TIMEOUT)
    finally:
        left = head.lose_client_servers.read_text()
        head.lose_client_servers.unlink()
    assert left == "0", "the head lost the first server it started for this driver"
    assert f"connecting again (attempt 2 of {ray_address.CONNECT_ATTEMPTS})" in done.stderr
    result = _result(done.stdout)
    assert result["ray_client"]
    _assert_trained(result, tmp_path, ray_data=False)
    assert Path(result["checkpoint"]).is_file() and Path(result["log_dir"], "metrics.csv").is_file()


def test_ray_job_submit_runs_the_script_and_its_logs_show_the_result(head: Head, tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    shutil.copy(DRIVER_SCRIPT, job_dir)
    # A model in a module beside the script: the workers import it from the job's working dir.
    (job_dir / "usermodel.py").write_text(
        "from raylane.testing import ClassifierModel\n\nclass UserModel(ClassifierModel):\n    pass\n"
    )
    (job_dir / "train.py").write_text(
        "from cluster_driver import report\nfrom usermodel import UserModel\n\nreport(UserModel)\n"
    )
    ray_cli = Path(sys.executable).with_name("ray")
    submit = [str(ray_cli), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(job_dir)]
    output = _run([*submit, "--", sys.executable, "train.py"], tmp_path, head.env).stdout

    assert "succeeded" in output.lower()
    result = _result(output)  # the job's own output, streamed back by `ray job submit`
    assert not result["ray_client"]
    # The job's driver runs in Ray's copy of the working dir on the head node, and finds its files there.
    _assert_trained(result, Path(result["cwd"]))


def _pool_script(head: Head, cwd: Path, *args: str, **env: str) -> tuple[dict[str, Any], str]:
    """Run tests/warm_pool_driver.py on the head with the pool on: its report, and all it printed."""
    env = {**head.env, "RAY_ADDRESS": head.gcs_address, "RAYLANE_WARM_POOL": "1", **env}
    result = _run([sys.executable, str(POOL_DRIVER), *args], cwd, env)
    output = result.stdout + result.stderr
    return printed_report(result.stdout, warm_pool_driver.PREFIX), output


def _pool_holds(head: Head, cwd: Path, want: int, timeout_s: float) -> dict[str, Any]:
    """Once the pool holds ``want`` waiting workers (0: once none is left at all), or after ``timeout_s``: their pids
    ("waiting"), and how many pool workers there were at first ("first_named"). Asked by a script that imports Ray
    alone, told the names this environment's pool workers have."""
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    prefix = f"{warm_pool.fingerprint()}:"
    command = [sys.executable, str(POOL_WAITING), warm_pool.NAMESPACE, prefix, str(want), str(timeout_s)]
    return printed_report(_run(command, cwd, env).stdout, warm_pool_waiting.PREFIX)


def _pool_waiting(head: Head, cwd: Path, want: int) -> dict[str, Any]:
    """:func:`_pool_holds`, failing unless the pool came to hold ``want`` waiting workers in time."""
    report = _pool_holds(head, cwd, want, POOL_WAIT_S)
    assert not report.get("timed_out"), f"the pool never held exactly {want} waiting workers: {report}"
    return report


@pytest.mark.timeout(420)
def test_the_next_script_trains_on_the_warm_workers_the_last_one_left(head: Head, tmp_path: Path) -> None:
    first, _ = _pool_script(head, tmp_path, "fit")
    assert first["pooled"] == [False, False], "the first script on this head finds no pool"
    left = _pool_waiting(head, tmp_path, 2)["waiting"]

    # The second script ends with its own ray.shutdown(), its workers still warm; the first one simply exited.
    second, output = _pool_script(head, tmp_path, "fit-then-shutdown")
    assert second["pooled"] == [True, True], "both ranks were claimed from the pool the first script left"
    assert second["weights"] == first["weights"], "the same results as on fresh workers"
    warning = next((line for line in output.splitlines() if warm_pool_driver.RANK_1_WARNING in line), None)
    assert warning is not None and "raylane rank 1" in warning, "rank 1's warning reached this driver, named"
    refilled = _pool_waiting(head, tmp_path, 2)["waiting"]
    assert not set(refilled) & set(left), "a claimed worker serves one driver only; ray.shutdown() left fresh ones"

    off, _ = _pool_script(head, tmp_path, "fit", RAYLANE_WARM_POOL="0")
    assert off["pooled"] == [False, False] and off["weights"] == first["weights"]
    unchanged = _pool_waiting(head, tmp_path, 2)["waiting"]
    assert unchanged == refilled, "with the pool off, a script takes none and leaves none"


@pytest.mark.timeout(420)
def test_pool_workers_end_with_a_killed_claimer_and_when_nobody_claims_them(head: Head, tmp_path: Path) -> None:
    if len(_pool_holds(head, tmp_path, 2, timeout_s=5)["waiting"]) != 2:
        _pool_script(head, tmp_path, "fit")  # this test alone: a script leaves the pool
        _pool_waiting(head, tmp_path, 2)
    marker = tmp_path / "training"
    env = {**head.env, "RAY_ADDRESS": head.gcs_address, "RAYLANE_WARM_POOL": "1"}
    command = [sys.executable, str(POOL_DRIVER), "fit-until-killed", str(marker)]
    with (tmp_path / "killed.log").open("wb") as log:
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DRIVER_TIMEOUT
        while not marker.exists():
            assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the driver never started training"
            time.sleep(0.2)
    finally:
        driver.kill()
        driver.wait(timeout=10)
    # The claimed workers are detached from the killed driver's job; they notice it ended, and leave.
    _pool_waiting(head, tmp_path, 0)

    # A script that leaves workers nobody claims: they leave after RAYLANE_WARM_POOL_TIMEOUT.
    _pool_script(head, tmp_path, "fit", RAYLANE_WARM_POOL_TIMEOUT="10")
    assert _pool_waiting(head, tmp_path, 0)["first_named"] == 2, "the script left 2 workers, which then left"


@pytest.mark.timeout(60)
def test_example_cluster_config_is_what_ray_up_accepts_with_the_tested_versions() -> None:
    import ray
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs first

    config = yaml.safe_load((Path(__file__).parents[1] / "examples" / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)

    assert prepared["provider"]["type"] == "local", "needs no cloud credentials"
    assert len(prepared["provider"]["worker_ips"]) == prepared["max_workers"] == 2
    setup = " ".join(prepared["setup_commands"])
    assert setup.index("torch==2.13.0") < setup.index("ray[default]"), "torch is pinned and installed first"
    assert f"ray[default]=={ray.__version__}" in setup, "the cluster runs the Ray these tests ran"
    assert "--ray-client-server-port=10001" in " ".join(prepared["head_start_ray_commands"])
