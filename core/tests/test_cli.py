"""``raylane backends``, run as users run it: a separate Python process, over what is installed.

Each run imports Lightning (seconds), so the runs start together, once per module, and the tests read their results.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from raylane import list_backends
from raylane.cli import main

if TYPE_CHECKING:
    from conftest import FakeSite

GOOD_BACKEND = """
from raylane import hookimpl

class GoodStrategy:
    pass

@hookimpl
def raylane_strategy_class():
    return GoodStrategy
"""
NO_STRATEGY_BACKEND = """
from raylane import hookimpl

@hookimpl
def raylane_backend_options():
    return {}
"""


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def start_cli(cwd: Path, extra_path: Path | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "raylane.cli", "backends"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(make_module_site: Callable[[str], FakeSite]) -> Iterator[dict[str, Run]]:
    installed = make_module_site("installed")
    installed.distribution("raylane-cli-good", "1.4.2", backends={"rltest_cli_good": installed.module(GOOD_BACKEND)})
    installed.distribution("raylane-cli-broken", "0.9", backends={"rltest_cli_broken": "raylane_cli_no_such_module"})
    installed.distribution(
        "raylane-cli-incomplete", "0.1", backends={"rltest_cli_incomplete": installed.module(NO_STRATEGY_BACKEND)}
    )
    clashing = make_module_site("clashing")
    clashing.distribution("raylane-clash-one", "1.0", backends={"rltest_clash": "clash_one"})
    clashing.distribution("raylane-clash-two", "2.0", backends={"rltest_clash": "clash_two"})

    cwd = installed.root.parent  # not the repository: `python -m` puts the working directory on sys.path
    processes = {
        "installed": start_cli(cwd, installed.root),
        "clashing": start_cli(cwd, clashing.root),
    }
    try:
        results = {}
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=120)
            results[name] = Run(process.returncode, stdout, stderr)
        yield results
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def table(stdout: str) -> list[list[str]]:
    """The rows of the backends table, each split into NAME, DISTRIBUTION, VERSION and STATUS."""
    lines = stdout.splitlines()
    header = lines[0]
    assert re.fullmatch(r"NAME +DISTRIBUTION +VERSION +STATUS", header), header
    starts = [header.index(column) for column in ("DISTRIBUTION", "VERSION", "STATUS")]
    rows = []
    for line in lines[1:]:
        cells = re.split(r" {2,}", line, maxsplit=3)
        assert len(cells) == 4, line
        assert [line.index(cell, start) for cell, start in zip(cells[1:], starts)] == starts, "columns are aligned"
        rows.append(cells)
    return rows


def test_backends_lists_every_installed_backend_by_name(runs: dict[str, Run]) -> None:
    run = runs["installed"]
    fakes = [
        ("rltest_cli_broken", "raylane-cli-broken", "0.9"),
        ("rltest_cli_good", "raylane-cli-good", "1.4.2"),
        ("rltest_cli_incomplete", "raylane-cli-incomplete", "0.1"),
    ]

    assert run.returncode == 0, run.stderr
    listed = [(name, distribution, version) for name, distribution, version, _ in table(run.stdout)]
    assert listed == sorted([*fakes, *((info.name, info.distribution, info.version) for info in list_backends())])


def test_backends_says_so_when_none_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Discovery reads the metadata on sys.path; with only an empty directory there, nothing is installed.
    monkeypatch.setattr(sys, "path", [str(tmp_path)])

    assert main(["backends"]) == 0
    assert (
        capsys.readouterr().out == "No raylane backends are installed. Install one, e.g. `pip install raylane-ddp`.\n"
    )


def test_backends_shows_which_backends_can_be_used(runs: dict[str, Run]) -> None:
    run = runs["installed"]

    assert run.returncode == 0, run.stderr
    rows = {row[0]: row[1:] for row in table(run.stdout)}
    assert rows["rltest_cli_good"] == ["raylane-cli-good", "1.4.2", "ok"]
    distribution, version, status = rows["rltest_cli_broken"]
    assert (distribution, version) == ("raylane-cli-broken", "0.9")
    assert status.startswith("unusable: Backend 'rltest_cli_broken' (entry point 'raylane_cli_no_such_module'")
    assert "ModuleNotFoundError" in status
    assert rows["rltest_cli_incomplete"][2].startswith(
        "unusable: Backend 'rltest_cli_incomplete' implements no raylane_strategy_class hook"
    )
    names = list(rows)
    assert names == sorted(names)


def test_backends_reports_two_distributions_claiming_one_name_as_an_error(runs: dict[str, Run]) -> None:
    run = runs["clashing"]

    assert run.returncode == 1
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: Backend name 'rltest_clash' is claimed by two installed distributions")
    assert "raylane-clash-one 1.0" in run.stderr and "raylane-clash-two 2.0" in run.stderr


@pytest.mark.parametrize("argv", [["frobnicate"], []], ids=["unknown command", "no command"])
def test_argparse_rejects_a_missing_or_unknown_command_with_exit_code_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)

    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("usage: raylane")
