"""raylane_tune's hook implementations, found through the ``raylane.plugins`` entry point by every backend's host.

Import-light on purpose: every raylane worker loads it, and outside a Tune trial each hook answers at once without
importing Ray Tune.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from raylane import hookimpl
from raylane_tune import _ray_tune

if TYPE_CHECKING:
    from raylane import LaunchOptions
    from raylane.placement import WorkerReservation

TRIAL_ENV = "RAYLANE_TUNE_TRIAL"
"""Set in the workers of a run whose driver is a Tune trial (the trial id): the report callbacks report only there."""


@hookimpl
def raylane_reserve_workers(bundles: list[dict[str, float]], options: LaunchOptions) -> WorkerReservation | None:
    """Inside a Tune trial, the workers take the trial's own bundles; anywhere else the core reserves its own."""
    if not _ray_tune.in_tune_trial():
        return None
    from raylane_tune.placement import reserve_in_trial

    return reserve_in_trial(bundles, options)


@hookimpl
def raylane_workers_that_fit(options: LaunchOptions) -> int | None:
    """Inside a Tune trial, an elastic run has the trial's worker bundles (``max`` unless sized otherwise)."""
    if not _ray_tune.in_tune_trial():
        return None
    from raylane_tune.placement import workers_in_trial

    return workers_in_trial(options)


@hookimpl
def raylane_worker_env() -> Mapping[str, str]:
    """Tell the workers of a trial's run that their driver reports to Tune (see :data:`TRIAL_ENV`)."""
    if not _ray_tune.in_tune_trial():
        return {}
    from ray import tune

    return {TRIAL_ENV: tune.get_context().get_trial_id() or "unknown"}


@hookimpl
def raylane_relay_metrics(trainer: Any, topic: str, payload: Any) -> None:
    from raylane_tune import reporting  # light: Ray Tune itself is imported only to report

    if topic == reporting.REPORT_TOPIC:
        from raylane_tune.callbacks import deliver  # on the driver, whose Trainer has imported Lightning already

        deliver(trainer, payload)


def in_trial_worker() -> bool:
    """True in a raylane worker whose driver is a Tune trial."""
    return bool(os.environ.get(TRIAL_ENV))
