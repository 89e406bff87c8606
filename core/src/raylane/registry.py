"""Finds backends through the ``raylane.backends`` entry-point group and loads one when it is asked for.

Listing reads installed metadata only; nothing is imported until a backend is used. Built-in backends (``ddp``,
``horovod``, ``sharded``) are separate distributions found the same way as anyone else's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

from raylane.errors import BackendConflictError, BackendLoadError, BackendNotFoundError
from raylane.host import BackendHost

BACKENDS_GROUP = "raylane.backends"
EXTENSIONS_GROUP = "raylane.plugins"

# Backends this project publishes, with the distribution that provides each: the hint shown when one is missing.
KNOWN_BACKENDS = {
    "ddp": "raylane-ddp",
    "deepspeed": "raylane-deepspeed",
    "horovod": "raylane-horovod",
    "sharded": "raylane-sharded",
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendInfo:
    """An installed backend, as its distribution's metadata describes it."""

    name: str
    distribution: str
    version: str
    entry_point: str


def discover(path: Iterable[str] | None = None) -> dict[str, BackendInfo]:
    """Every installed backend by name. Two distributions claiming one name is an error naming both.

    ``path`` restricts the search to those directories (default: the interpreter's ``sys.path``).
    """
    found: dict[str, BackendInfo] = {}
    for entry_point, dist_name, version in _entry_points(BACKENDS_GROUP, path):
        info = BackendInfo(entry_point.name, dist_name, version, entry_point.value)
        previous = found.get(info.name)
        if previous is not None and previous.distribution != info.distribution:
            raise BackendConflictError(
                f"Backend name {info.name!r} is claimed by two installed distributions: "
                f"{previous.distribution} {previous.version} ({previous.entry_point}) and "
                f"{info.distribution} {info.version} ({info.entry_point}). Uninstall one of them."
            )
        found[info.name] = info
    return found


def list_backends() -> list[BackendInfo]:
    """Installed backends (name, distribution, version), sorted by name. Imports nothing."""
    return sorted(discover().values(), key=lambda info: info.name)


def load_plugin(name: str) -> object:
    """Import the backend's plugin object. Fails with the installed names and an install hint when it is missing."""
    installed = discover()
    info = installed.get(name)
    if info is None:
        available = ", ".join(sorted(installed)) or "none"
        distribution = KNOWN_BACKENDS.get(name, f"raylane-{name}")
        raise BackendNotFoundError(
            f"No raylane backend named {name!r} is installed (installed backends: {available}). "
            f"If it is published, install it with `pip install {distribution}`."
        )
    try:
        return metadata.EntryPoint(name=info.name, value=info.entry_point, group=BACKENDS_GROUP).load()
    except Exception as err:
        raise BackendLoadError(
            f"Backend {name!r} (entry point {info.entry_point!r} in distribution {info.distribution} "
            f"{info.version}) failed to import: {type(err).__name__}: {err}"
        ) from err


def load_extensions() -> list[tuple[str, object]]:
    """Extension plugins (group ``raylane.plugins``) that hook into every backend; a broken one is logged, skipped."""
    extensions = []
    for entry_point, dist_name, version in _entry_points(EXTENSIONS_GROUP, None):
        try:
            extensions.append((f"{dist_name}:{entry_point.name}", entry_point.load()))
        except Exception as err:  # one broken extension must not stop training with the others
            log.warning(
                "raylane skips extension %r from %s %s: %s: %s",
                entry_point.value,
                dist_name,
                version,
                type(err).__name__,
                err,
            )
    return extensions


def backend_host(name: str) -> BackendHost:
    """A plugin host for backend ``name``: the core's defaults, the installed extensions and the backend itself."""
    return BackendHost(name, load_plugin(name), load_extensions())


def _entry_points(group: str, path: Iterable[str] | None) -> list[tuple[metadata.EntryPoint, str, str]]:
    distributions = metadata.distributions(path=list(path)) if path is not None else metadata.distributions()
    seen: set[tuple[str, str]] = set()
    entries = []
    for dist in distributions:
        # The group first: reading a distribution's metadata parses its whole METADATA file, which for the hundred or
        # so distributions of a training environment took 0.1 s per lookup, paid by every Trainer and every worker.
        in_group = dist.entry_points.select(group=group)
        if not in_group:
            continue
        dist_name = dist.metadata["Name"]
        for entry_point in in_group:
            # The same distribution can appear twice on sys.path (e.g. an editable install plus a build dir).
            if (dist_name, entry_point.name) in seen:
                continue
            seen.add((dist_name, entry_point.name))
            entries.append((entry_point, dist_name, dist.version))
    return entries
