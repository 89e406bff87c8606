"""Which imported source files a warm worker reports as changed. The worker side of it, end to end on real warm
workers, is tested in tests/test_warm_reuse.py."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from raylane.imported_code import ImportedCode


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path for this test's modules, which are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(text)
    importlib.invalidate_caches()
    return path


def test_a_module_imported_and_recorded_counts_as_changed_once_its_file_is_edited_or_removed(modules: Path) -> None:
    edited, removed, kept = (_write(modules, name, "VALUE = 1\n") for name in ("edited", "removed", "kept"))
    code = ImportedCode.since_now()
    for name in ("edited", "removed", "kept"):
        importlib.import_module(name)
    code.record()
    assert code.changed() == []

    edited.write_text("VALUE = 22\n")
    removed.unlink()
    assert code.changed() == sorted([str(edited), str(removed)])
    assert str(kept) not in code.changed()


def test_an_edit_with_the_same_size_counts_by_its_modification_time(modules: Path) -> None:
    path = _write(modules, "same_size", "VALUE = 1\n")
    code = ImportedCode.since_now()
    importlib.import_module("same_size")
    code.record()
    path.write_text("VALUE = 2\n")
    stamp = path.stat()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))  # a coarse file-system clock, one tick on
    assert code.changed() == [str(path)]


def test_modules_imported_before_tracking_or_after_the_last_record_are_not_stamped(modules: Path) -> None:
    before = _write(modules, "before", "VALUE = 1\n")
    importlib.import_module("before")
    code = ImportedCode.since_now()
    code.record()
    after = _write(modules, "after", "VALUE = 1\n")
    importlib.import_module("after")
    before.write_text("VALUE = 22\n")
    after.write_text("VALUE = 22\n")
    assert code.changed() == [], "the process's own modules, and one imported since the last record, are not stamped"
    code.record()  # stamps "after" as it is now
    assert code.changed() == []
