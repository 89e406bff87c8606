"""How a Ray Dataset reaches the ranks: split once per entry point, each rank takes its shard.

Loaders given to the entry point (``trainer.fit(model, from_ray(ds, ...))``) are split on the driver, as Ray Train
does: ``Dataset.streaming_split`` starts a coordinator actor that runs the dataset's pipeline and deals its blocks to
the ranks, and its per-rank ``DataIterator`` objects travel in the launch payload. The driver holds them until the
entry point ends, so the coordinator lives exactly as long; every attempt of a restarted fit splits afresh.

Loaders a LightningDataModule builds inside the workers are split by rank 0 when Lightning hands them to the strategy
(``process_dataloader``, reached by every rank at the same point) and the iterators are broadcast to the other ranks.
That coordinator belongs to rank 0's process and ends with it (Ray keeps an actor whose handle left its process by
pickle alive until its owner exits).

Fit, validate and test split with ``equal=True`` (the same number of rows, hence batches and collectives, on every
rank); predict with ``equal=False`` (every row exactly once).

Ray Data sizes its executor from the cluster's resources, and it cannot tell that the workers' placement group holds
some of them for good: each split's executor is told to leave the workers' CPUs and GPUs out of its plan
(``ExecutionOptions.exclude_resources``, set on the dataset's own DataContext only while the split is made: the
coordinator keeps its copy, and the user's Dataset is as it was afterwards).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import ray
from ray import cloudpickle

from raylane import _lightning
from raylane.data import RayDataLoader
from raylane.errors import ConfigurationError

if TYPE_CHECKING:
    from raylane.options import LaunchOptions
    from raylane.strategy import RayStrategyMixin

BARE_DATASET = (
    "a ray.data.Dataset was passed to the Trainer as a dataloader. Wrap it so each worker streams its own shard: "
    "`from raylane.data import from_ray` and pass `from_ray(dataset, batch_size=...)`."
)


def check_entry_point_data(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Reject a bare ``ray.data.Dataset`` among an entry point's arguments; return whether any ``from_ray`` loader
    is there. Runs on the driver before any actor starts."""
    found = False
    for value in _loaders(args, kwargs):
        if _is_ray_dataset(value):
            raise ConfigurationError(BARE_DATASET)
        found = found or isinstance(value, RayDataLoader)
    return found


def split_for_workers(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], options: LaunchOptions, predicting: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The entry point's arguments with each ``from_ray`` loader replaced by a copy carrying a fresh split."""

    equal = not predicting

    def split(value: Any) -> Any:
        if isinstance(value, RayDataLoader):
            _check_cpus_left(options)
            with excluding_workers(value.dataset, options):
                splits = value.dataset.streaming_split(options.workers, equal=equal)
            return value.with_splits(splits, equal)
        if isinstance(value, (list, tuple)):
            return type(value)(split(item) for item in value)
        if isinstance(value, dict):
            return {key: split(item) for key, item in value.items()}
        return value

    if not any(isinstance(value, RayDataLoader) for value in _loaders(args, kwargs)):
        return args, dict(kwargs)
    return tuple(split(value) for value in args), {key: split(value) for key, value in kwargs.items()}


def shard_for_rank(strategy: RayStrategyMixin, dataloader: Any) -> Any:
    """This rank's shard of a ``from_ray`` loader (other dataloaders pass through). Called by every rank at the same
    point of the entry point (Lightning's ``Strategy.process_dataloader``)."""
    if not isinstance(dataloader, RayDataLoader) or strategy.worker_context is None:
        return dataloader
    environment = strategy.ray_environment
    rank = environment.global_rank()
    if dataloader.splits is None:
        dataloader = _split_on_rank_zero(strategy, dataloader, rank)
    return dataloader.for_rank(rank, strategy.root_device)


def _split_on_rank_zero(strategy: RayStrategyMixin, loader: RayDataLoader, rank: int) -> RayDataLoader:
    # A datamodule built this loader inside the workers: rank 0 splits, the others receive the iterators.
    equal = strategy.lightning_module.trainer.state.fn != _lightning.PREDICTING  # type: ignore[attr-defined]
    if rank == 0:
        _check_cpus_left(strategy.launch_options)
        with excluding_workers(loader.dataset, strategy.launch_options):
            splits = loader.dataset.streaming_split(strategy.ray_environment.world_size(), equal=equal)
        strategy.broadcast(cloudpickle.dumps(splits), src=0)  # type: ignore[attr-defined]
    else:
        splits = cloudpickle.loads(strategy.broadcast(None, src=0))  # type: ignore[attr-defined]
    return loader.with_splits(splits, equal)


@contextmanager
def excluding_workers(dataset: Any, options: LaunchOptions) -> Iterator[None]:
    """While the block runs, ``dataset``'s executor plans without the CPUs and GPUs the workers reserve.

    ``streaming_split`` hands the coordinator actor a copy of the dataset's DataContext when it starts it, so the
    option holds for the split's whole life, and the dataset's own context is restored on the way out. A resource the
    user capped with ``resource_limits`` is left alone (Ray Data refuses both on one resource; the cap is theirs).
    Ray 2.60 deprecates ``exclude_resources`` (for ``label_selector``, which needs labelled nodes), with a warning
    that would name this module: it is silenced here. Without the option (a later Ray), the split is made as it is.
    """
    execution = dataset.context.execution_options
    if not hasattr(execution, "exclude_resources"):
        yield
        return
    from ray.data import ExecutionResources

    reserved = options.worker_resources()
    limits = execution.resource_limits
    workers = ExecutionResources(
        cpu=0.0 if math.isfinite(limits.cpu) else reserved.get("CPU", 0.0) * options.workers,
        gpu=0.0 if math.isfinite(limits.gpu) else reserved.get("GPU", 0.0) * options.workers,
    )
    before = execution.exclude_resources
    _set_excluded(execution, before.add(workers))
    try:
        yield
    finally:
        _set_excluded(execution, before)


def _set_excluded(execution: Any, resources: Any) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exclude_resources.* is deprecated", category=DeprecationWarning)
        execution.exclude_resources = resources


def _check_cpus_left(options: LaunchOptions) -> None:
    """Ray Data's read and map tasks need CPUs the workers do not hold; without any, the first epoch would wait
    forever."""
    total = ray.cluster_resources().get("CPU", 0.0)
    reserved = options.workers * options.cpus_per_worker
    if total - reserved < 1:
        raise ConfigurationError(
            f"from_ray: the {options.workers} workers reserve {reserved:g} of the cluster's {total:g} CPUs, and Ray "
            "Data's tasks (reading, map_batches) need at least one more. Start Ray with more CPUs "
            f"(ray.init(num_cpus={int(reserved) + 1}) or more on a laptop), add a node, or lower cpus_per_worker."
        )


def _loaders(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    """The arguments of an entry point and the items of its lists, tuples and dicts (where dataloaders go)."""
    values: list[Any] = []
    for value in [*args, *kwargs.values()]:
        if isinstance(value, (list, tuple)):
            values.extend(value)
        elif isinstance(value, dict):
            values.extend(value.values())
        else:
            values.append(value)
    return values


def _is_ray_dataset(value: Any) -> bool:
    data = sys.modules.get("ray.data")  # no Dataset can exist before ray.data is imported
    return data is not None and isinstance(value, data.Dataset)
