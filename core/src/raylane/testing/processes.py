"""Helpers for tests that start processes of their own: a free TCP port, and a driver's environment.

A test that runs a driver script in a subprocess must not hand it the ``RAY_ADDRESS`` of the test process's Ray (or of
the shell it ran in): the script would join that cluster instead of starting the local Ray a user's script gets.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def free_port() -> int:
    """A TCP port the OS reports free now. Another process may take it before it is used: fine for tests only."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_without_ray_address(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``RAY_ADDRESS``, plus ``extra``: what a fresh user's shell would hand a
    script."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env.update(extra or {})
    return env
