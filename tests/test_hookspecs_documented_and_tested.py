"""Meta-tests: every hook specification is documented, on the generated reference page, and exercised by a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from raylane import hookspecs

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PAGE = ROOT / "docs" / "hooks.md"  # `nox -s docs` generates it from the docstrings
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


def test_reference_page_renders_every_hook() -> None:
    """mkdocstrings renders every public member with a docstring, unless the page narrows it down."""
    directive = re.search(r"^::: raylane\.hookspecs\n((?:[ \t]+.*\n)*)", REFERENCE_PAGE.read_text(), re.MULTILINE)
    assert directive, f"{REFERENCE_PAGE} must render raylane.hookspecs (a `::: raylane.hookspecs` line)"
    narrowing = re.findall(r"^\s+(members|filters|show_if_no_docstring):", directive.group(1), re.MULTILINE)
    assert not narrowing, f"{REFERENCE_PAGE} must not narrow down the hooks it renders: drop {narrowing}"
    assert all(not hook.startswith("_") for hook in HOOKS), "mkdocstrings leaves out private names"
