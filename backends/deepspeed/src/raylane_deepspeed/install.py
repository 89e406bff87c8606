"""Whether DeepSpeed is installed, and how to install it without replacing torch (checked on the driver)."""

from __future__ import annotations

import importlib.util
import sys

from raylane import BackendLoadError

DEEPSPEED_REQUIREMENT = "deepspeed==0.19.8"
INSTALL_HINT = f'pip install --no-build-isolation "{DEEPSPEED_REQUIREMENT}" "torch==<the torch you have>"'


def require_deepspeed() -> None:
    """Fail with the install command when DeepSpeed is missing.

    DeepSpeed is published as a source distribution whose setup.py imports torch: without ``--no-build-isolation``
    pip builds it against a freshly downloaded (CUDA, multi-GB) torch, and an unpinned torch may replace yours.
    """
    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):  # blocked in sys.modules, or a broken parent
        found = False
    if not found:
        raise BackendLoadError(
            f"The deepspeed backend needs DeepSpeed, which is not installed in this Python environment "
            f"({sys.executable}). Install it with `{INSTALL_HINT}`."
        )
