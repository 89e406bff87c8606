"""Ray Datasets as Lightning dataloaders: ``trainer.fit(model, from_ray(train, batch_size=64))``.

Each rank streams its own shard of the dataset while Ray Data's tasks read and preprocess it (``map_batches``) on the
cluster's CPUs; nothing is materialised on the driver or in the ranks. The split into shards is made once per Trainer
entry point, which :mod:`raylane.shards` does; this module holds what users touch and how one shard is iterated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raylane.errors import ConfigurationError

if TYPE_CHECKING:
    import ray.data
    import torch


@dataclass(frozen=True)
class BatchOptions:
    """The options of ``DataIterator.iter_torch_batches`` that ``from_ray`` passes on."""

    batch_size: int
    dtypes: Any = None
    collate_fn: Callable[[Any], Any] | None = None
    local_shuffle_buffer_size: int | None = None
    local_shuffle_seed: int | None = None
    prefetch_batches: int = 1
    drop_last: bool = False


class RayDataLoader:
    """A Ray Dataset that Lightning iterates like a dataloader. Build it with :func:`from_ray`.

    Given to a raylane Trainer, each rank iterates its own shard (see :mod:`raylane.shards`). Given to a plain
    one-process Trainer, it iterates the whole dataset, which makes a one-process reference run easy. It has no
    length: Lightning counts an epoch as done when the shard is exhausted.
    """

    def __init__(self, dataset: ray.data.Dataset, options: BatchOptions) -> None:
        self.dataset = dataset
        self.options = options
        self.splits: list[Any] | None = None  # every rank's DataIterator of this entry point's split
        self.shard: Any = None  # this rank's DataIterator, inside a worker
        self.rank = 0
        self.device = "cpu"
        self.equal = True  # whether every rank gets the same number of rows (all but predict)
        self._batches: Iterator[Any] | None = None  # the Ray iterator of the epoch in progress

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def with_splits(self, splits: list[Any], equal: bool) -> RayDataLoader:
        """A copy that carries one entry point's split (``Dataset.streaming_split``) to the workers."""
        bound = copy.copy(self)
        bound.splits, bound.equal, bound._batches = splits, equal, None
        return bound

    def for_rank(self, rank: int, device: torch.device | str) -> RayDataLoader:
        """A copy that iterates rank ``rank``'s shard and puts batches on ``device``."""
        if self.splits is None:
            raise RuntimeError("this from_ray loader was not split for the workers (raylane.shards does that)")
        bound = copy.copy(self)
        bound.shard, bound.rank, bound.device, bound._batches = self.splits[rank], rank, str(device), None
        return bound

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_batches": None}  # a running Ray iterator stays in its process

    def __iter__(self) -> Iterator[Any]:
        # A generator: Lightning calls iter() to check that a dataloader is iterable and drops the result, which must
        # not start an epoch of the split (every rank has to start each epoch together).
        return self._epoch()

    def _epoch(self) -> Iterator[Any]:
        if self._batches is not None:
            # The previous epoch was left part-way (limit_*_batches, the sanity check): end it so the split's
            # coordinator can start the next one.
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
        source = self.shard if self.shard is not None else self.dataset
        options = self.options
        batches = source.iter_torch_batches(
            batch_size=options.batch_size,
            dtypes=options.dtypes,
            collate_fn=options.collate_fn,
            device=self.device,
            local_shuffle_buffer_size=options.local_shuffle_buffer_size,
            local_shuffle_seed=options.local_shuffle_seed,
            prefetch_batches=options.prefetch_batches,
            drop_last=options.drop_last,
        )
        self._batches = iter(batches)
        count = 0
        for batch in self._batches:
            count += 1
            yield batch
        self._batches = None
        if count == 0 and self.shard is not None and self.equal:
            raise ConfigurationError(self._empty_message())

    def _empty_message(self) -> str:
        world = len(self.splits or ())
        return (
            f"from_ray(batch_size={self.batch_size}, drop_last={self.options.drop_last}): rank {self.rank}'s shard of "
            f"the Ray Dataset gave no batch in this epoch. The dataset is empty, or it holds fewer rows than the "
            f"{world} ranks need (each rank streams an equal share; with drop_last=True a share smaller than "
            "batch_size gives no batch). Check the dataset (ds.count()), or use a smaller batch_size or "
            "drop_last=False."
        )

    def __repr__(self) -> str:
        return f"from_ray({self.dataset!r}, batch_size={self.batch_size})"


def from_ray(
    dataset: ray.data.Dataset,
    *,
    batch_size: int,
    dtypes: torch.dtype | dict[str, torch.dtype] | None = None,
    collate_fn: Callable[[Any], Any] | None = None,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    prefetch_batches: int = 1,
    drop_last: bool = False,
) -> RayDataLoader:
    """Feed ``dataset`` to a Trainer entry point (fit's train and val, validate, test, predict, a datamodule's
    ``*_dataloader``): every rank streams its own shard, as dicts of tensors on the rank's device.

    The options are those of ``ray.data.DataIterator.iter_torch_batches``. ``dtypes`` and ``collate_fn`` exclude
    each other (Ray Data's rule); with ``collate_fn`` the batch is whatever it returns.

    Per epoch, fit/validate/test give every rank the same number of rows: when the row count does not divide by the
    number of workers, up to ``workers - 1`` rows are left out of that epoch, so no rank runs a step (and a collective)
    the others do not. Predict gives every row to exactly one rank and returns rank 0's predictions first, then rank
    1's, and so on; pass an id column through ``predict_step`` to join them back to the rows.
    """
    import ray.data

    if not isinstance(dataset, ray.data.Dataset):
        raise ConfigurationError(f"from_ray takes a ray.data.Dataset; got {type(dataset).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"from_ray(batch_size={batch_size!r}): batch_size must be a positive int.")
    if dtypes is not None and collate_fn is not None:
        raise ConfigurationError(
            "from_ray: dtypes and collate_fn cannot be combined (Ray Data's rule); convert types in the collate_fn."
        )
    if prefetch_batches < 0:
        raise ConfigurationError(f"from_ray(prefetch_batches={prefetch_batches}): must be 0 or more.")
    options = BatchOptions(
        batch_size=batch_size,
        dtypes=dtypes,
        collate_fn=collate_fn,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
        prefetch_batches=prefetch_batches,
        drop_last=drop_last,
    )
    return RayDataLoader(dataset, options)
