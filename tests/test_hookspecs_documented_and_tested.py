"""Meta-tests: every hook specification is documented and exercised by some test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from raylane import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name, value in vars(hookspecs).items() if name.startswith("raylane_") and callable(value))
TEST_SOURCES = {
    path: path.read_text()
    for pattern in ("tests/**/test_*.py", "core/tests/**/test_*.py", "backends/*/tests/**/test_*.py")
    for path in ROOT.glob(pattern)
    if path.resolve() != Path(__file__).resolve()
}


def test_there_are_hooks() -> None:
    assert len(HOOKS) >= 10


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert doc.startswith(("*Driver", "*Worker")), f"{hook}'s docstring must say where it runs"
    assert len(doc) > 80, f"{hook} needs a real docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook: str) -> None:
    assert any(hook in source for source in TEST_SOURCES.values()), f"no test mentions {hook}"
