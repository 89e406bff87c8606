"""``raylane.data.from_ray`` without a backend: its checks, the driver's checks of an entry point's arguments, and a
plain one-process Trainer, which iterates the whole dataset (the reference a distributed run is compared with)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from raylane import ConfigurationError
from raylane.data import from_ray
from raylane.predictions import merge_predictions
from raylane.shards import check_entry_point_data
from raylane.testing import ensure_local_ray, make_dataset, quiet_trainer
from raylane.testing.ray_data import RowRecordingModel, make_ray_dataset, rows_seen


@pytest.fixture(scope="module")
def dataset() -> Any:
    ensure_local_ray()
    return make_ray_dataset(40)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"batch_size": True}, "batch_size must be a positive int"),
        ({"batch_size": "8"}, "batch_size must be a positive int"),
        ({"batch_size": 8, "dtypes": torch.float32, "collate_fn": lambda batch: batch}, "cannot be combined"),
        ({"batch_size": 8, "prefetch_batches": -1}, "prefetch_batches"),
    ],
)
def test_invalid_options_are_rejected(dataset: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        from_ray(dataset, **options)


def test_only_a_ray_dataset_is_accepted() -> None:
    with pytest.raises(ConfigurationError, match=r"takes a ray.data.Dataset; got TensorDataset"):
        from_ray(make_dataset(8), batch_size=8)  # type: ignore[arg-type]


def test_entry_point_arguments_reject_a_bare_dataset_wherever_a_dataloader_goes(dataset: Any) -> None:
    loader = DataLoader(make_dataset(8), batch_size=4)
    assert check_entry_point_data((None, from_ray(dataset, batch_size=8), None), {}) is True
    assert check_entry_point_data((None, loader, [loader]), {"ckpt_path": None}) is False
    for args, kwargs in [((None, dataset), {}), ((None, [loader, dataset]), {}), ((), {"dataloaders": {"a": dataset}})]:
        with pytest.raises(ConfigurationError, match=r"Wrap it .*`from_ray\(dataset, batch_size=\.\.\.\)"):
            check_entry_point_data(args, kwargs)


def test_a_one_process_trainer_iterates_the_whole_dataset_every_epoch(dataset: Any, tmp_path: Path) -> None:
    model = RowRecordingModel(report_dir=str(tmp_path))
    trainer = quiet_trainer(accelerator="cpu", devices=1, max_epochs=2, enable_checkpointing=False)
    trainer.fit(model, from_ray(dataset, batch_size=8), from_ray(make_ray_dataset(12), batch_size=8))
    [report] = rows_seen(tmp_path)
    assert sorted(report["fit-epoch0"]) == sorted(report["fit-epoch1"]) == list(range(40))
    assert sorted(report["val-run1"]) == list(range(12))
    assert trainer.global_step == 2 * 5
    predictions = trainer.predict(model, from_ray(dataset, batch_size=16))
    assert [batch["id"].tolist() for batch in predictions] == [list(range(start, 40))[:16] for start in (0, 16, 32)]


def test_streamed_predictions_keep_rank_order_without_a_warning() -> None:
    rank0 = [[torch.tensor([4, 5]), torch.tensor([9])]]
    rank1 = [[torch.tensor([1, 2])]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = merge_predictions([rank0, rank1], [[[]], [[]]], [2], in_dataset_order=False)
    assert [batch.tolist() for batch in merged] == [[4, 5], [9], [1, 2]]
