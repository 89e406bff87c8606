"""Without Horovod the backend is listed but unusable, and says how to install it; its entry module stays light.

The checks run in a fresh interpreter whose import system refuses ``horovod``, so they hold whether or not Horovod is
installed in this environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

BLOCK_HOROVOD = textwrap.dedent(
    """
    import sys

    class BlockHorovod:
        def find_spec(self, name, path=None, target=None):
            if name == "horovod" or name.startswith("horovod."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockHorovod())
    """
)


WITHOUT_HOROVOD = BLOCK_HOROVOD + textwrap.dedent(
    """
    import contextlib, io, json

    import raylane_horovod

    heavy = sorted(m for m in sys.modules if m.split(".")[0] == "horovod" or m == "raylane_horovod.strategy")
    report = {"modules": heavy}

    from raylane import BackendLoadError, get_strategy

    try:
        get_strategy("horovod", workers=2, lightning="pytorch_lightning")
    except BackendLoadError as err:
        report["error"] = str(err)
    import ray

    report["ray_started"] = ray.is_initialized()

    from raylane.cli import main

    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        main(["backends"])
    report["listing"] = listing.getvalue()
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def without_horovod() -> dict[str, Any]:
    """One fresh interpreter (they are slow to start) for all the checks."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_HOROVOD], capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_get_strategy_fails_at_once_with_install_instructions(without_horovod: dict[str, Any]) -> None:
    assert without_horovod["error"].startswith("Backend 'horovod' needs Horovod")
    assert "python -m raylane_horovod.build_horovod --install" in without_horovod["error"]
    assert without_horovod["ray_started"] is False, "it failed before touching Ray"


def test_cli_lists_the_backend_as_unusable_with_the_reason(without_horovod: dict[str, Any]) -> None:
    [line] = [line for line in without_horovod["listing"].splitlines() if line.startswith("horovod ")]
    assert "raylane-horovod" in line
    assert "unusable: Backend 'horovod' needs Horovod" in line
    assert "build_horovod --install" in line


def test_entry_module_imports_neither_horovod_nor_the_strategy(without_horovod: dict[str, Any]) -> None:
    assert without_horovod["modules"] == []


def test_get_strategy_works_where_horovod_is_installed() -> None:
    pytest.importorskip("horovod.torch", reason="Horovod is not installed; the other direction is tested above")
    from raylane import get_strategy

    strategy = get_strategy("horovod", workers=2, compression="fp16", lightning="pytorch_lightning")
    assert type(strategy).__name__ == "RayHorovodStrategy"
    assert strategy.optimizer_settings.compression == "fp16"  # type: ignore[attr-defined]
