"""Without Horovod the backend is listed but unusable, and says how to install it; its entry module stays light.

Each check runs in a fresh interpreter whose import system refuses ``horovod``, so it holds whether or not Horovod is
installed in this environment.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

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


def run_python(source: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HOROVOD + textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_get_strategy_fails_at_once_with_install_instructions() -> None:
    result = run_python(
        """
        import time
        from raylane import BackendLoadError, get_strategy

        started = time.monotonic()
        try:
            get_strategy("horovod", workers=2)
        except BackendLoadError as err:
            print("raised:", err)
        print("seconds:", time.monotonic() - started)
        import ray
        print("ray started:", ray.is_initialized())
        """
    )
    assert result.returncode == 0, result.stderr
    assert "raised: Backend 'horovod' needs Horovod" in result.stdout
    assert "python -m raylane_horovod.build_horovod --install" in result.stdout
    assert "ray started: False" in result.stdout


def test_cli_lists_the_backend_as_unusable_with_the_reason() -> None:
    result = run_python(
        """
        from raylane.cli import main

        main(["backends"])
        """
    )
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("horovod ")]
    assert "raylane-horovod" in line
    assert "unusable: Backend 'horovod' needs Horovod" in line
    assert "build_horovod --install" in line


def test_entry_module_imports_neither_horovod_nor_the_strategy() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, raylane_horovod; print(sorted(m for m in sys.modules if m.split('.')[0] == 'horovod' "
            "or m == 'raylane_horovod.strategy'))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_get_strategy_works_where_horovod_is_installed() -> None:
    pytest.importorskip("horovod.torch", reason="Horovod is not installed; the other direction is tested above")
    from raylane import get_strategy

    strategy = get_strategy("horovod", workers=2, compression="fp16")
    assert type(strategy).__name__ == "RayHorovodStrategy"
    assert strategy.optimizer_settings.compression == "fp16"  # type: ignore[attr-defined]
