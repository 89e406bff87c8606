"""The code a warm worker imported while it ran entry points, and whether it changed since.

A worker keeps every module an entry point imported: the user's model file, a helper package, whatever Lightning
imported lazily. A later entry point unpickles its payload against those modules, so a model file edited between two
Trainers of a notebook (and reloaded there) would otherwise train the old code on warm workers, and the new code on
fresh ones. The launcher asks each worker for :meth:`ImportedCode.changed` before reusing it, and starts fresh workers
when any file changed.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

# A source file as it was when its module was first seen: (path, modification time in ns, size in bytes).
Stamp = tuple[str, int, int]


class ImportedCode:
    """The files of the modules this process imported after :meth:`since_now`, stamped when first seen."""

    def __init__(self, before: frozenset[str]) -> None:
        self._before = before
        self._stamps: dict[str, Stamp | None] = {}

    @classmethod
    def since_now(cls) -> ImportedCode:
        """Track the modules imported from now on (the ones already imported are the process's own)."""
        return cls(frozenset(sys.modules))

    def record(self) -> None:
        """Stamp the files of the modules imported since the last call. Called right after an entry point's payload is
        unpickled (the user's modules it names) and when the entry point ends (what it imported on the way), so a file
        edited while its module was being imported is the only change it can miss."""
        for name, module in list(sys.modules.items()):
            if name not in self._before and name not in self._stamps:
                self._stamps[name] = _stamp_of(module)

    def changed(self) -> list[str]:
        """The files, among those stamped, that were edited, replaced or removed since."""
        return sorted({stamp[0] for stamp in self._stamps.values() if stamp is not None and _stamp(stamp[0]) != stamp})


def _stamp_of(module: ModuleType | None) -> Stamp | None:
    path = getattr(module, "__file__", None)
    return _stamp(os.path.abspath(path)) if isinstance(path, str) else None  # None: built in, or a namespace package


def _stamp(path: str) -> Stamp | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (path, status.st_mtime_ns, status.st_size)
