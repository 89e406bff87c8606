"""Which Ray Client failures raylane connects again after (:mod:`raylane.ray_address`). The failures themselves, made
to happen on a real head, are in tests/test_cluster_launch_modes.py; here the three ways Ray 2.60's proxy reports a
lost server, as its tracebacks end, and failures that a new connection would only repeat."""

from __future__ import annotations

import pytest

from raylane.ray_address import names_a_lost_client_server

pytestmark = pytest.mark.timeout(10)

INIT_FAILED = "ConnectionAbortedError: Initialization failure from server:\nTraceback (most recent call last):\n"


@pytest.mark.parametrize(
    "ending",
    [
        "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err for detailed logs.",
        '  File "proxier.py", line 396, in start_specific_server\n    cmd = psutil_proc.cmdline()\n'
        "psutil.ZombieProcess: PID still exists but it's a zombie (pid=25551)",
        "RuntimeError: Proxy failed to Connect to backend! Check `ray_client_server.err` and "
        "`ray_client_server_23000.err` on the head node of the cluster for the relevant logs.",
    ],
    ids=["exited-at-once", "zombie-while-checked", "never-answered"],
)
def test_a_lost_client_server_is_connected_again(ending: str) -> None:
    assert names_a_lost_client_server(INIT_FAILED + ending)


@pytest.mark.parametrize(
    "error_text",
    [
        INIT_FAILED + "RuntimeError: Version mismatch: The cluster was started with Ray 2.59.0, this client has 2.60.0",
        INIT_FAILED + "ValueError: runtime_env: the working_dir does not exist",
        "ConnectionError: ray client connection timeout",
        "Starting Ray client server failed",  # a text that is not Ray Client's init failure
    ],
)
def test_other_failures_are_raised_at_once(error_text: str) -> None:
    assert not names_a_lost_client_server(error_text)
