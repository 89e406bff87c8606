"""The core's default hook implementations. Registered like any backend, and run after the backend's own."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from raylane import console, elastic, environment, placement, topology
from raylane.context import WorkerContext
from raylane.hookspecs import hookimpl
from raylane.options import LaunchOptions


@hookimpl(trylast=True)
def raylane_placement_bundles(options: LaunchOptions) -> list[dict[str, float]]:
    return [options.worker_resources() for _ in range(options.workers)]


@hookimpl(trylast=True)
def raylane_resumes_on_any_world_size() -> bool:
    return False  # unless the backend says so: an elastic run must never meet a checkpoint it cannot load


@hookimpl(trylast=True)
def raylane_workers_that_fit(options: LaunchOptions) -> int | None:
    free = elastic.free_resources()
    return None if free is None else elastic.workers_that_fit(options, free)


@hookimpl(trylast=True)
def raylane_reserve_workers(
    bundles: list[dict[str, float]], options: LaunchOptions, name: str
) -> placement.WorkerReservation:
    group = placement.reserve(bundles, options.placement_strategy, options.resource_timeout, name)
    return placement.WorkerReservation(group, tuple(range(len(bundles))))


@hookimpl
def raylane_worker_actor_options(options: LaunchOptions) -> dict[str, Any]:
    resources = options.worker_resources()
    actor_options: dict[str, Any] = {
        "num_cpus": resources.pop("CPU", 0),
        "num_gpus": resources.pop("GPU", 0),
        "resources": resources,
        # Threaded: one thread runs the entry point, another answers the driver's metric-relay polls.
        "max_concurrency": 2,
    }
    if options.runtime_env is not None:
        # Local folders are already uploaded (once per group, raylane.group): these are Ray's URIs for them.
        actor_options["runtime_env"] = dict(options.runtime_env)
    return actor_options


@hookimpl(trylast=True)
def raylane_assign_devices(
    placements: Sequence[topology.WorkerPlacement], options: LaunchOptions
) -> list[topology.DeviceAssignment]:
    return topology.assign_devices(placements, use_gpu=options.use_gpu)


@hookimpl
def raylane_worker_env(context: WorkerContext) -> Mapping[str, str]:
    return {
        **console.terminal_env(),
        **environment.forwarded_env(os.environ),
        **context.options.env,
        **environment.rank_env(context),
    }
