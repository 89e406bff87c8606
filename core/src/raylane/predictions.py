"""Puts every rank's predictions back into dataset order.

Lightning's distributed predict sampler deals samples round-robin (rank r gets positions r, r+W, ...), so each rank's
batches interleave with the others'. Lightning records the dataset index of every sample each rank predicted; with
those, per-sample outputs are sorted back and regrouped into batches of the original size, which is what one process
would have returned. Outputs that cannot be split per sample (a scalar per batch, say) keep their batch granularity,
ordered by each batch's first index.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


class _Unsplittable(Exception):
    pass


def merge_predictions(
    per_rank_predictions: Sequence[list[list[Any]]],
    per_rank_indices: Sequence[list[list[list[int]]]],
    batch_sizes: Sequence[int | None] = (),
    in_dataset_order: bool = True,
) -> list[Any]:
    """Merge ``[rank][dataloader][batch]`` outputs into Lightning's return shape, in dataset order.

    ``batch_sizes`` are the dataloaders' batch sizes; without one, the largest batch any rank predicted is used
    (too small when every rank saw fewer samples than a batch). ``in_dataset_order=False`` (streamed data, such as
    Ray Datasets, has no sample indices) keeps the batches as they are, rank 0's first.

    The per-rank batch lists are emptied as they are merged, and a rank's batch is let go as soon as its last sample
    is in a merged batch: the driver holds the outputs about once, never the ranks' copy and the merged one whole.
    """
    num_dataloaders = len(per_rank_predictions[0]) if per_rank_predictions else 0
    merged = []
    for dl in range(num_dataloaders):
        batches = [batch for rank in per_rank_predictions for batch in rank[dl]]
        for rank in per_rank_predictions:
            rank[dl].clear()
        indices = [index for rank in per_rank_indices for index in (rank[dl] if dl < len(rank) else [])]
        batch_size = batch_sizes[dl] if dl < len(batch_sizes) else None
        merged.append(_merge_dataloader(batches, indices, batch_size) if in_dataset_order else batches)
    return merged[0] if num_dataloaders == 1 else merged


def _merge_dataloader(batches: list[Any], indices: list[list[int]], batch_size: int | None) -> list[Any]:
    if len(indices) != len(batches) or not batches:
        if batches:
            warnings.warn(
                "raylane could not find the sample indices of the predict batches (the dataloader is not a "
                "torch DataLoader?); predictions are grouped by rank, not in dataset order.",
                stacklevel=3,
            )
        return batches
    batch_size = batch_size or max(len(batch_indices) for batch_indices in indices)
    try:
        samples = [
            (index, sample)
            for batch, batch_indices in zip(batches, indices)
            for index, sample in zip(batch_indices, split_batch(batch, len(batch_indices)))
        ]
    except _Unsplittable:
        order = sorted(range(len(batches)), key=lambda i: min(indices[i], default=0))
        return [batches[i] for i in order]
    batches.clear()  # from here on only the samples (views) hold each rank's batch
    samples.sort(key=lambda pair: pair[0])
    ordered: list[Any] = [sample for _, sample in samples]
    samples.clear()
    merged = []
    for start in range(0, len(ordered), batch_size):
        end = min(start + batch_size, len(ordered))
        merged.append(join_samples(ordered[start:end]))
        ordered[start:end] = [None] * (end - start)  # a rank's batch is freed once its last sample is merged
    return merged


def split_batch(batch: Any, size: int) -> list[Any]:
    """Split one batch output into ``size`` per-sample outputs (tensors along dim 0, recursing into containers)."""
    if isinstance(batch, Tensor):
        if batch.ndim == 0 or batch.shape[0] != size:
            raise _Unsplittable
        return list(batch.unbind(0))
    if isinstance(batch, Mapping):
        columns = {key: split_batch(value, size) for key, value in batch.items()}
        return [type(batch)({key: column[i] for key, column in columns.items()}) for i in range(size)]  # type: ignore[call-arg]
    if isinstance(batch, tuple):
        fields = [split_batch(value, size) for value in batch]
        rows = list(zip(*fields)) if fields else [() for _ in range(size)]
        return [type(batch)(*row) if hasattr(batch, "_fields") else tuple(row) for row in rows]
    if isinstance(batch, list):
        if len(batch) == size and not _is_structure(batch, size):
            return list(batch)
        fields = [split_batch(value, size) for value in batch]
        return [list(row) for row in zip(*fields)]
    raise _Unsplittable


def join_samples(samples: list[Any]) -> Any:
    """Inverse of :func:`split_batch` for one batch."""
    first = samples[0]
    if isinstance(first, Tensor):
        return torch.stack(samples)
    if isinstance(first, Mapping):
        return type(first)({key: join_samples([s[key] for s in samples]) for key in first})  # type: ignore[call-arg]
    if isinstance(first, tuple):
        columns = [join_samples(list(column)) for column in zip(*samples)]
        return type(first)(*columns) if hasattr(first, "_fields") else tuple(columns)
    if isinstance(first, list) and all(isinstance(s, list) and len(s) == len(first) for s in samples):
        return [join_samples(list(column)) for column in zip(*samples)]
    return list(samples)


def _is_structure(batch: list[Any], size: int) -> bool:
    # A list whose items all split by the batch size is a container of per-batch fields, not one item per sample.
    return all(isinstance(item, Tensor) and item.ndim > 0 and item.shape[0] == size for item in batch)
