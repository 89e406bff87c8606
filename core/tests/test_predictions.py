"""``trainer.predict`` on W workers returns what one process returns: same batches, same order, same values.

Each rank's outputs are built the way Lightning's distributed predict sampler deals samples (rank r predicts dataset
positions r, r+W, r+2W, ... in batches of B, the last one short), from one per-sample ground truth.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raylane import predictions as predictions_module
from raylane.predictions import join_samples, merge_predictions, split_batch

property_test = settings(max_examples=50, deadline=None)
FEATURES = 3


class Prediction(NamedTuple):
    logits: torch.Tensor
    index: torch.Tensor


def features(indices: list[int]) -> torch.Tensor:
    # Every sample's row is distinct, so any sample out of place changes the result.
    return torch.tensor([[float(i * FEATURES + f) for f in range(FEATURES)] for i in indices]).reshape(-1, FEATURES)


# What a LightningModule's predict_step returns for the batch of these dataset indices.
OUTPUTS: dict[str, Callable[[list[int]], Any]] = {
    "tensor": features,
    "vector": lambda indices: torch.tensor(indices) * 10,
    "dict": lambda indices: {"logits": features(indices), "index": torch.tensor(indices)},
    "tuple": lambda indices: (features(indices), torch.tensor(indices)),
    "namedtuple": lambda indices: Prediction(features(indices), torch.tensor(indices)),
    "strings": lambda indices: [f"sample-{i}" for i in indices],
    "dict_with_strings": lambda indices: {"y": features(indices), "name": [f"sample-{i}" for i in indices]},
    "list_of_tensors": lambda indices: [features(indices), torch.tensor(indices)],
}


def rank_batches(dataset_size: int, workers: int, batch_size: int, rank: int) -> list[list[int]]:
    """The dataset indices of each batch rank ``rank`` predicts under Lightning's unrepeated distributed sampler."""
    positions = list(range(rank, dataset_size, workers))
    return [positions[start : start + batch_size] for start in range(0, len(positions), batch_size)]


def sequential_batches(dataset_size: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, dataset_size))) for start in range(0, dataset_size, batch_size)]


def distributed_predict(
    dataset_sizes: list[int], workers: int, batch_size: int, output: Callable[[list[int]], Any]
) -> tuple[list[list[list[Any]]], list[list[list[list[int]]]]]:
    """Per-rank ``[dataloader][batch]`` outputs and indices, as the workers send them to the driver."""
    predictions, indices = [], []
    for rank in range(workers):
        per_dataloader = [rank_batches(size, workers, batch_size, rank) for size in dataset_sizes]
        indices.append(per_dataloader)
        predictions.append([[output(batch) for batch in batches] for batches in per_dataloader])
    return predictions, indices


def assert_same(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected), f"{type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype
        assert actual.shape == expected.shape
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    else:
        assert actual == expected


@property_test
@given(
    dataset_size=st.integers(1, 40),
    workers=st.integers(1, 5),
    batch_size=st.integers(1, 8),
    kind=st.sampled_from(sorted(OUTPUTS)),
)
def test_merged_predictions_equal_one_process(dataset_size: int, workers: int, batch_size: int, kind: str) -> None:
    output = OUTPUTS[kind]
    predictions, indices = distributed_predict([dataset_size], workers, batch_size, output)

    merged = merge_predictions(predictions, indices, [batch_size])

    assert_same(merged, [output(batch) for batch in sequential_batches(dataset_size, batch_size)])


@property_test
@given(
    dataset_sizes=st.lists(st.integers(1, 30), min_size=2, max_size=3),
    workers=st.integers(1, 4),
    batch_size=st.integers(1, 6),
    kind=st.sampled_from(sorted(OUTPUTS)),
)
def test_several_dataloaders_give_one_list_each(
    dataset_sizes: list[int], workers: int, batch_size: int, kind: str
) -> None:
    output = OUTPUTS[kind]
    predictions, indices = distributed_predict(dataset_sizes, workers, batch_size, output)

    merged = merge_predictions(predictions, indices, [batch_size] * len(dataset_sizes))

    assert_same(merged, [[output(b) for b in sequential_batches(size, batch_size)] for size in dataset_sizes])


def test_ranks_with_fewer_samples_than_the_batch_size_still_merge_into_full_batches() -> None:
    # 6 samples on 2 workers with batch size 4: each rank predicts one batch of 3 samples.
    predictions, indices = distributed_predict([6], workers=2, batch_size=4, output=OUTPUTS["vector"])

    merged = merge_predictions(predictions, indices, [4])

    assert [batch.tolist() for batch in merged] == [[0, 10, 20, 30], [40, 50]]


@property_test
@given(dataset_size=st.integers(1, 40), workers=st.integers(1, 5), batch_size=st.integers(1, 8))
def test_outputs_that_cannot_be_split_come_back_per_batch_ordered_by_first_index(
    dataset_size: int, workers: int, batch_size: int
) -> None:
    # A scalar per batch (a loss, say) has no per-sample rows to put back in order.
    predictions, indices = distributed_predict(
        [dataset_size], workers, batch_size, lambda batch: torch.tensor(float(batch[0]))
    )

    merged = merge_predictions(predictions, indices)

    every_batch = [batch for rank in indices for batch in rank[0]]
    assert [float(value) for value in merged] == sorted(float(batch[0]) for batch in every_batch)


def test_predictions_without_sample_indices_are_returned_by_rank_with_a_warning() -> None:
    predictions = [[[torch.tensor([0, 2])]], [[torch.tensor([1, 3])]]]

    with pytest.warns(UserWarning, match="not in dataset order"):
        merged = merge_predictions(predictions, [[], []])

    assert [batch.tolist() for batch in merged] == [[0, 2], [1, 3]]


def test_each_ranks_batch_is_let_go_as_soon_as_it_is_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver never holds every rank's outputs and the merged copy at once (1 GiB of predictions must not take
    2 GiB): the caller's lists are emptied, and each rank's batch is freed once its last sample is in a merged batch."""
    workers, batch_size = 2, 4
    # Whole tensors, as they arrive from the workers (not views, which would keep a base of their own).
    predictions, indices = distributed_predict([64], workers, batch_size, lambda batch: features(batch).clone())
    held = [weakref.ref(batch) for rank in predictions for batch in rank[0]]  # 8 batches of 4 from each rank
    still_held_at_each_join = []

    def counting_join(samples: list[Any]) -> Any:
        still_held_at_each_join.append(sum(batch() is not None for batch in held))
        return join_samples(samples)

    monkeypatch.setattr(predictions_module, "join_samples", counting_join)
    merged = merge_predictions(predictions, indices, [batch_size])

    assert_same(merged, [features(batch) for batch in sequential_batches(64, batch_size)])
    # Merged batch k needs each rank's batch k // 2; every earlier one is gone, though the caller still has its lists.
    assert still_held_at_each_join == [len(held) - workers * (k // 2) for k in range(len(merged))]
    assert all(batch() is None for batch in held)


@property_test
@given(size=st.integers(1, 6), kind=st.sampled_from(sorted(OUTPUTS)))
def test_join_samples_inverts_split_batch(size: int, kind: str) -> None:
    batch = OUTPUTS[kind](list(range(size)))

    samples = split_batch(batch, size)

    assert len(samples) == size
    assert_same(join_samples(samples), batch)


def test_split_batch_gives_one_output_per_sample() -> None:
    samples = split_batch({"y": features([4, 7]), "name": ["sample-4", "sample-7"]}, 2)

    assert [sample["name"] for sample in samples] == ["sample-4", "sample-7"]
    assert [sample["y"].tolist() for sample in samples] == [[12.0, 13.0, 14.0], [21.0, 22.0, 23.0]]
