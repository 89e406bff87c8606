"""Helpers for tests that start processes of their own: a free TCP port, a driver's environment, code every Python
process of a test runs at start-up, and the report a script prints.

A test that runs a driver script in a subprocess must not hand it the ``RAY_ADDRESS`` of the test process's Ray (or of
the shell it ran in): the script would join that cluster instead of starting the local Ray a user's script gets.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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


def python_path_running_at_startup(code: str, folder: Path, python_path: str | None = None) -> str:
    """A ``PYTHONPATH`` with which every Python process (a script, a Ray head and all the processes it starts) runs
    ``code`` as it starts: written to ``folder/sitecustomize.py``, ``folder`` put first on ``python_path`` (default:
    this process's ``PYTHONPATH``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    rest = os.environ.get("PYTHONPATH") if python_path is None else python_path
    return os.pathsep.join([str(folder), *filter(None, [rest])])


def printed_report(output: str, prefix: str = "REPORT ") -> dict[str, Any]:
    """The JSON a script printed last on a line starting with ``prefix``; fails, showing the output's end, without one.

    Scripts run by tests print one such line with what they saw, so a test asserts on data instead of on log text.
    """
    reports = [line for line in output.splitlines() if line.startswith(prefix)]
    assert reports, f"no {prefix.strip()!r} line in the output:\n{output[-4000:]}"
    return json.loads(reports[-1][len(prefix) :])  # type: ignore[no-any-return]
