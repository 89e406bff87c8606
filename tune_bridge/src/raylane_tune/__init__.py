"""raylane_tune: Ray Tune hyperparameter search over raylane's distributed Lightning trials.

``get_tune_resources`` sizes each trial as one placement group (the trial's process and all its workers), the
``raylane.plugins`` hooks put the workers into that group, and the report callbacks bring rank 0's metrics and
checkpoints to ``ray.tune.report`` in the trial. Names are imported on first use: raylane workers import this package
(the hooks live in :mod:`raylane_tune.plugin`) and must not pay for Ray Tune.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raylane_tune.callbacks import NotInTuneWarning, TuneReportCallback, TuneReportCheckpointCallback
    from raylane_tune.resources import get_tune_resources

_EXPORTS = {
    "NotInTuneWarning": "raylane_tune.callbacks",
    "TuneReportCallback": "raylane_tune.callbacks",
    "TuneReportCheckpointCallback": "raylane_tune.callbacks",
    "get_tune_resources": "raylane_tune.resources",
}

__all__ = ["NotInTuneWarning", "TuneReportCallback", "TuneReportCheckpointCallback", "get_tune_resources"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raylane_tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
