"""Backends are found through real installed metadata: listing imports nothing, and every failure names its culprit."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from pytorch_lightning.strategies import StrategyRegistry

from raylane import BackendConflictError, BackendInfo, BackendLoadError, BackendNotFoundError, list_backends
from raylane.api import register_with_lightning
from raylane.registry import KNOWN_BACKENDS, backend_host, discover, load_extensions, load_plugin

if TYPE_CHECKING:
    from conftest import FakeSite

GOOD_BACKEND = """
from raylane import hookimpl

class FakeStrategy:
    pass

@hookimpl
def raylane_strategy_class():
    return FakeStrategy
"""
EXPLODING_MODULE = """
raise RuntimeError("this backend must not be imported while listing")
"""


def test_two_distributions_claiming_one_name_is_an_error_naming_both(fake_site: FakeSite) -> None:
    fake_site.distribution("raylane-fast", "1.2", backends={"fast": "raylane_fast"})
    fake_site.distribution("other-fast", "0.3", backends={"fast": "other_fast.plugin"})

    with pytest.raises(BackendConflictError) as raised:
        discover(path=[str(fake_site.root)])

    message = str(raised.value)
    assert "Backend name 'fast' is claimed by two installed distributions" in message
    assert "raylane-fast 1.2 (raylane_fast)" in message
    assert "other-fast 0.3 (other_fast.plugin)" in message


def test_distinct_backends_are_listed_with_their_distribution_and_version(fake_site: FakeSite) -> None:
    fake_site.distribution("raylane-alpha", "1.0", backends={"alpha": "raylane_alpha"})
    fake_site.distribution("beta-tools", "2.5.1", backends={"beta": "beta_tools.raylane:plugin"})
    fake_site.distribution("unrelated", "9.9")

    assert discover(path=[str(fake_site.root)]) == {
        "alpha": BackendInfo("alpha", "raylane-alpha", "1.0", "raylane_alpha"),
        "beta": BackendInfo("beta", "beta-tools", "2.5.1", "beta_tools.raylane:plugin"),
    }


def test_one_distribution_seen_twice_on_the_path_is_not_a_conflict(make_site: Callable[[str], FakeSite]) -> None:
    # An editable install next to a build directory puts the same distribution on sys.path twice.
    first, second = make_site("first"), make_site("second")
    for site in (first, second):
        site.distribution("raylane-alpha", "1.0", backends={"alpha": "raylane_alpha"})

    assert list(discover(path=[str(first.root), str(second.root)])) == ["alpha"]


def test_a_missing_backend_lists_the_installed_ones_and_the_install_hint(
    fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.distribution("raylane-listed", "1.0", backends={"rltest_listed": fake_site.module(GOOD_BACKEND)})
    monkeypatch.syspath_prepend(str(fake_site.root))

    with pytest.raises(BackendNotFoundError) as raised:
        load_plugin("nosuch")

    message = str(raised.value)
    assert "No raylane backend named 'nosuch' is installed" in message
    installed = re.search(r"installed backends: ([^)]*)\)", message)
    assert installed is not None
    assert installed.group(1).split(", ") == sorted(discover())
    assert "rltest_listed" in installed.group(1)
    assert "`pip install raylane-nosuch`" in message


def test_a_known_backend_that_is_missing_names_its_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KNOWN_BACKENDS, "rltest_known", "raylane-known-dist")

    with pytest.raises(BackendNotFoundError, match=re.escape("`pip install raylane-known-dist`")):
        load_plugin("rltest_known")


def test_a_backend_that_fails_to_import_names_its_entry_point_and_distribution(
    fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = fake_site.module(GOOD_BACKEND)
    fake_site.distribution("raylane-broken", "0.1", backends={"rltest_broken": "raylane_no_such_module_anywhere"})
    fake_site.distribution("raylane-good", "0.2", backends={"rltest_good": good})
    monkeypatch.syspath_prepend(str(fake_site.root))

    with pytest.raises(BackendLoadError) as raised:
        load_plugin("rltest_broken")

    message = str(raised.value)
    assert "'raylane_no_such_module_anywhere'" in message
    assert "raylane-broken 0.1" in message
    assert "ModuleNotFoundError" in message
    assert BackendInfo("rltest_broken", "raylane-broken", "0.1", "raylane_no_such_module_anywhere") in list_backends()
    # The broken one does not get in the way of the others.
    assert load_plugin("rltest_good") is sys.modules[good]
    assert backend_host("rltest_good").strategy_class() is sys.modules[good].FakeStrategy


def test_listing_imports_no_backend(fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    exploding = fake_site.module(EXPLODING_MODULE)
    fake_site.distribution("raylane-exploding", "3.0", backends={"rltest_exploding": exploding})
    monkeypatch.syspath_prepend(str(fake_site.root))

    assert BackendInfo("rltest_exploding", "raylane-exploding", "3.0", exploding) in list_backends()
    assert exploding not in sys.modules
    with pytest.raises(BackendLoadError, match="RuntimeError: this backend must not be imported while listing"):
        load_plugin("rltest_exploding")


def test_backends_are_listed_by_name(fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_site.distribution("raylane-zeta", "1.0", backends={"rltest_zeta": "raylane_zeta"})
    fake_site.distribution("raylane-alpha", "1.0", backends={"rltest_alpha": "raylane_alpha"})
    monkeypatch.syspath_prepend(str(fake_site.root))

    names = [info.name for info in list_backends()]

    assert {"rltest_alpha", "rltest_zeta"} <= set(names)
    assert names == sorted(names)


def test_lightning_knows_every_backend_by_name_without_importing_it(
    fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    exploding = fake_site.module(EXPLODING_MODULE)
    fake_site.distribution("raylane-exploding", "3.0", backends={"rltest_lazy": exploding})
    monkeypatch.syspath_prepend(str(fake_site.root))
    try:
        assert "ray_rltest_lazy" in register_with_lightning()
        assert "ray_rltest_lazy" in StrategyRegistry
        assert exploding not in sys.modules
    finally:
        StrategyRegistry.pop("ray_rltest_lazy", None)


def test_a_broken_extension_is_skipped_with_a_warning_and_the_others_load(
    fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    working = fake_site.module("from raylane import hookimpl\n")
    fake_site.distribution(
        "raylane-extras", "0.4", extensions={"rltest_working": working, "rltest_broken": "raylane_no_such_extension"}
    )
    monkeypatch.syspath_prepend(str(fake_site.root))

    with caplog.at_level(logging.WARNING, logger="raylane.registry"):
        extensions = dict(load_extensions())

    assert extensions["raylane-extras:rltest_working"] is sys.modules[working]
    assert "raylane-extras:rltest_broken" not in extensions
    assert "raylane skips extension 'raylane_no_such_extension' from raylane-extras 0.4" in caplog.text
