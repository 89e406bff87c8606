"""Fixtures shared by the core's tests. Installed backends are faked with real metadata files, never with mocks."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from raylane.registry import BACKENDS_GROUP, EXTENSIONS_GROUP


class FakeSite:
    """A directory laid out like site-packages: ``*.dist-info`` folders that importlib.metadata reads, and modules."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self.module_names: list[str] = []

    def distribution(
        self,
        name: str,
        version: str = "1.0",
        *,
        backends: Mapping[str, str] | None = None,
        extensions: Mapping[str, str] | None = None,
    ) -> None:
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        sections = [
            f"[{group}]\n" + "".join(f"{entry} = {value}\n" for entry, value in entries.items())
            for group, entries in ((BACKENDS_GROUP, backends), (EXTENSIONS_GROUP, extensions))
            if entries
        ]
        (info / "entry_points.txt").write_text("\n".join(sections))
        importlib.invalidate_caches()

    def module(self, source: str) -> str:
        """Write a module with a name no other test uses; returns the name."""
        name = f"raylane_fake_{uuid.uuid4().hex[:12]}"
        (self.root / f"{name}.py").write_text(textwrap.dedent(source))
        self.module_names.append(name)
        importlib.invalidate_caches()
        return name


def _site_factory(root: Path) -> Iterator[Callable[[str], FakeSite]]:
    sites: list[FakeSite] = []

    def make(name: str) -> FakeSite:
        sites.append(FakeSite(root / name))
        return sites[-1]

    yield make
    for site in sites:
        for module in site.module_names:
            sys.modules.pop(module, None)


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[Callable[[str], FakeSite]]:
    """Make fake site directories for one test; their modules leave ``sys.modules`` after it."""
    yield from _site_factory(tmp_path)


@pytest.fixture(scope="module")
def make_module_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], FakeSite]]:
    """The same, for fixtures shared by a module's tests."""
    yield from _site_factory(tmp_path_factory.mktemp("sites"))


@pytest.fixture
def fake_site(make_site: Callable[[str], FakeSite]) -> FakeSite:
    return make_site("site")
