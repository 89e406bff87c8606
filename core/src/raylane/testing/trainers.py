"""The quiet Trainer every test builds: no progress bar, no model summary, no logger, so a test's output shows what
matters (its assertions, the workers' errors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

QUIET: Mapping[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}


def quiet_trainer(**flags: Any) -> pl.Trainer:
    """``pl.Trainer(**flags)`` without a progress bar, model summary or logger (a flag given here wins)."""
    return pl.Trainer(**{**QUIET, **flags})
