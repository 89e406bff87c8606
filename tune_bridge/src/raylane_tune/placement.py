"""Placing a run's workers in the bundles the current Tune trial already holds, instead of reserving new ones.

A trial sized with :func:`raylane_tune.get_tune_resources` holds its own bundle (unless empty, see below) and then one
bundle per worker, so the workers start at once and no trial waits for resources another trial holds. A trial that
holds too little fails at once, saying what to pass, since waiting could never help: the trial's group cannot grow.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from raylane.errors import ResourceError
from raylane.options import LaunchOptions
from raylane.placement import WorkerReservation, fits
from raylane_tune import _ray_tune


def reserve_in_trial(bundles: Sequence[Mapping[str, float]], options: LaunchOptions) -> WorkerReservation:
    """The workers' bundles in the current trial's placement group; the group stays Tune's (``owned=False``)."""
    from ray import tune

    # With reuse_actors, the previous trial's Trainer may still keep its workers warm in these very bundles until
    # the garbage collector finds it (Lightning objects form cycles); collecting now releases them at once.
    gc.collect()
    group = ray.util.get_current_placement_group()
    if group is None:
        raise ResourceError(f"This Ray Tune trial runs outside any placement group. {_what_to_pass(options)}")
    # An empty first bundle is dropped by Tune: the trial's process then takes no bundle of its own.
    first_worker = 0 if _ray_tune.head_bundle_is_empty(tune.get_context().get_trial_resources()) else 1
    held = [dict(spec) for spec in group.bundle_specs]
    for_workers = held[first_worker:]
    if len(for_workers) < len(bundles) or not all(fits(b, h) for b, h in zip(bundles, for_workers)):
        besides = " besides the trial's own first bundle" if first_worker else ""
        raise ResourceError(
            f"The workers do not fit this Ray Tune trial's placement group, which cannot grow: {len(bundles)} "
            f"worker(s) need {_fmt_bundles(bundles)}{besides}, and the trial holds {_fmt_bundles(held)}. "
            f"{_what_to_pass(options)}"
        )
    return WorkerReservation(group, tuple(range(first_worker, first_worker + len(bundles))), owned=False)


def workers_in_trial(options: LaunchOptions) -> int:
    """How many of ``options``' workers the current trial's bundles hold (an elastic run's size inside a trial)."""
    from ray import tune

    group = ray.util.get_current_placement_group()
    if group is None:
        return 0
    first_worker = 0 if _ray_tune.head_bundle_is_empty(tune.get_context().get_trial_resources()) else 1
    bundle = options.worker_resources()
    return sum(1 for held in group.bundle_specs[first_worker:] if fits(bundle, held))


def _what_to_pass(options: LaunchOptions) -> str:
    return (
        "Reserve the workers with the trial: tune.with_resources(train_fn, get_tune_resources(strategy)) for a Tuner, "
        "or tune.run(train_fn, resources_per_trial=get_tune_resources(strategy)), where strategy is the one "
        f"passed to the Trainer, or get_tune_resources(<backend>, {_fmt_options(options)})."
    )


def _fmt_options(options: LaunchOptions) -> str:
    defaults = LaunchOptions(workers=options.workers)
    shown: dict[str, Any] = {"workers": options.workers}
    for name in ("cpus_per_worker", "use_gpu", "gpus_per_worker", "resources_per_worker", "placement_strategy"):
        value = getattr(options, name)
        if value != getattr(defaults, name):
            shown[name] = dict(value) if isinstance(value, Mapping) else value
    return ", ".join(f"{name}={value!r}" for name, value in shown.items())


def _fmt_bundles(bundles: Sequence[Mapping[str, float]]) -> str:
    inner = ", ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}" for b in bundles)
    return f"[{inner}]"
