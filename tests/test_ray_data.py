"""Ray Datasets streamed into the workers (``raylane.data.from_ray``) with the ddp backend, on a real local Ray."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import ray
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from raylane import ConfigurationError, WorkerError, get_strategy
from raylane.data import from_ray
from raylane.testing import KilledOnce, assert_released, ensure_local_ray
from raylane.testing.ray_data import RowRecordingModel, make_ray_dataset, rows_seen
from raylane.testing.ray_state import live_raylane_actors, release_dropped_trainers_workers

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def _ray() -> None:
    # A test's dropped Trainer leaves its idle workers to the next test's Trainer of the same shape, as a script's
    # leaves them to its next one: the splits must be made afresh for every run on warm workers too.
    ensure_local_ray()


@pytest.fixture(autouse=True, scope="module")
def _nothing_idle_after_the_module() -> Iterator[None]:
    yield
    release_dropped_trainers_workers()


@pytest.fixture
def nothing_idle() -> None:
    """For a test that checks that its run released everything, or needs CPUs no idle worker holds."""
    release_dropped_trainers_workers()


def _trainer(root: Path, workers: int = 2, strategy: Any = None, **flags: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "max_epochs": 2,
        "default_root_dir": str(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
    }
    return pl.Trainer(strategy=strategy or get_strategy("ddp", workers=workers), **{**defaults, **flags})


def _one_process(root: Path, **flags: Any) -> pl.Trainer:
    return _trainer(root, strategy="auto", accelerator="cpu", devices=1, **flags)


def _assert_each_row_once(per_rank: list[list[int]], rows: range) -> None:
    seen = [row for rank in per_rank for row in rank]
    assert sorted(seen) == list(rows), "every row exactly once across the ranks"


def _predicted_ids(predictions: list[dict[str, torch.Tensor]]) -> list[int]:
    return torch.cat([batch["id"] for batch in predictions]).tolist()


def test_fit_validate_predict_on_warm_workers_see_every_row_once(tmp_path: Path) -> None:
    model = RowRecordingModel(report_dir=str(tmp_path))
    trainer = _trainer(tmp_path)
    trainer.fit(model, from_ray(make_ray_dataset(64), batch_size=8), from_ray(make_ray_dataset(32), batch_size=8))

    assert trainer.current_epoch == 2
    assert trainer.global_step == 2 * 64 // (8 * 2)
    assert {"train_loss", "val_loss"} <= set(trainer.callback_metrics)
    reports = rows_seen(tmp_path)
    assert len(reports) == 2 and all(report["device"] == "cpu" for report in reports)
    for epoch in range(2):
        _assert_each_row_once([report[f"fit-epoch{epoch}"] for report in reports], range(64))
        _assert_each_row_once([report[f"val-run{epoch}"] for report in reports], range(32))
    assert reports[0]["fit-epoch0"] != reports[1]["fit-epoch0"]

    # Further entry points on the same warm workers get fresh splits.
    [validated] = trainer.validate(model, from_ray(make_ray_dataset(32), batch_size=8))
    assert validated["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    predictions = trainer.predict(model, from_ray(make_ray_dataset(61), batch_size=8))  # 61: the ranks differ
    ids = _predicted_ids(predictions)
    assert sorted(ids) == list(range(61)), "predict returns every row exactly once"
    # Joined back to the rows through the id column, each output is the model's output for that row.
    inputs = {int(row["id"]): torch.as_tensor(row["x"]) for row in make_ray_dataset(61).iter_rows()}
    with torch.no_grad():
        for batch in predictions:
            expected = model(torch.stack([inputs[int(i)] for i in batch["id"]]))
            torch.testing.assert_close(batch["output"], expected)
    trainer.strategy.release_workers()  # type: ignore[attr-defined]
    assert_released()


def test_uneven_rows_give_every_rank_the_same_number_of_rows(tmp_path: Path) -> None:
    model = RowRecordingModel(report_dir=str(tmp_path))
    trainer = _trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0)
    # 67 rows for 2 ranks: each streams 33 (one row sits this epoch out), in batches of 8, 8, 8, 8 and 1.
    trainer.fit(model, from_ray(make_ray_dataset(67), batch_size=8))
    seen = [report["fit-epoch0"] for report in rows_seen(tmp_path)]
    assert [len(rows) for rows in seen] == [33, 33]
    assert len(set(seen[0]) | set(seen[1])) == 66 and set(seen[0]).isdisjoint(seen[1])
    assert trainer.global_step == 5


def test_step_limits_and_validation_interval_count_as_in_one_process(tmp_path: Path) -> None:
    flags = {"max_epochs": 2, "limit_train_batches": 3, "val_check_interval": 2, "limit_val_batches": 1}

    def fit(trainer: pl.Trainer, report_dir: Path, workers: int) -> tuple[int, int]:
        model = RowRecordingModel(report_dir=str(report_dir))
        train = from_ray(make_ray_dataset(16 * 8 * workers), batch_size=8)
        trainer.fit(model, train, from_ray(make_ray_dataset(32), batch_size=4))
        report = rows_seen(report_dir)[0]
        return trainer.global_step, sum(key.startswith("val-run") for key in report)

    (tmp_path / "one").mkdir()
    (tmp_path / "ray").mkdir()
    reference = fit(_one_process(tmp_path / "one", **flags), tmp_path / "one", workers=1)
    distributed = fit(_trainer(tmp_path / "ray", **flags), tmp_path / "ray", workers=2)
    assert reference == (6, 2)
    assert distributed == reference


class RowsDataModule(pl.LightningDataModule):
    """Builds its Ray Datasets inside the workers, as datamodules do in ``setup``."""

    def train_dataloader(self) -> Any:
        return from_ray(make_ray_dataset(64), batch_size=8)

    def val_dataloader(self) -> Any:
        return from_ray(make_ray_dataset(32), batch_size=8)

    def predict_dataloader(self) -> Any:
        return from_ray(make_ray_dataset(45), batch_size=8)


def test_datamodule_dataloaders_built_in_the_workers_are_split_once(tmp_path: Path) -> None:
    model = RowRecordingModel(report_dir=str(tmp_path))
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=RowsDataModule())
    reports = rows_seen(tmp_path)
    _assert_each_row_once([report["fit-epoch0"] for report in reports], range(64))
    _assert_each_row_once([report["val-run0"] for report in reports], range(32))
    assert sorted(_predicted_ids(trainer.predict(model, datamodule=RowsDataModule()))) == list(range(45))


def test_restarted_fit_splits_afresh(tmp_path: Path) -> None:
    steps_per_epoch = 64 // (8 * 2)
    # In the third epoch, after the second epoch's checkpoint.
    killed = KilledOnce(rank=1, at_step=2 * steps_per_epoch + 1, folder=tmp_path)
    model = RowRecordingModel(report_dir=str(tmp_path), **killed.model_options())
    trainer = _trainer(
        tmp_path,
        strategy=get_strategy("ddp", workers=2, max_failures=1),
        max_epochs=4,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)],
    )
    trainer.fit(model, from_ray(make_ray_dataset(64), batch_size=8))
    assert killed.happened, "the failure was injected"
    assert trainer.current_epoch == 4
    reports = rows_seen(tmp_path)  # written by the restarted attempt, which resumed at the third epoch
    for epoch in (2, 3):
        _assert_each_row_once([report[f"fit-epoch{epoch}"] for report in reports], range(64))
    assert "fit-epoch1" not in reports[0]


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry_point", ["fit", "validate", "test", "predict"])
def test_bare_dataset_fails_on_the_driver_before_any_worker_starts(tmp_path: Path, entry_point: str) -> None:
    trainer = _trainer(tmp_path)
    started = time.monotonic()
    before = live_raylane_actors()
    with pytest.raises(ConfigurationError, match=r"from_ray\(dataset, batch_size=\.\.\.\)"):
        getattr(trainer, entry_point)(RowRecordingModel(), [make_ray_dataset(8)])
    assert time.monotonic() - started < 10
    assert live_raylane_actors() == before, "no worker started"


@pytest.mark.usefixtures("nothing_idle")
@pytest.mark.parametrize(
    ("rows", "options"),
    [(0, {"batch_size": 8}), (20, {"batch_size": 16, "drop_last": True})],
    ids=["empty", "batch-larger-than-shard"],
)
def test_no_batch_for_a_rank_fails_before_the_first_step(tmp_path: Path, rows: int, options: dict[str, Any]) -> None:
    dataset = make_ray_dataset(rows) if rows else ray.data.range(0).map_batches(lambda b: {"id": b["id"]})
    model = RowRecordingModel(report_dir=str(tmp_path))
    with pytest.raises(WorkerError, match="gave no batch in this epoch") as failure:
        _trainer(tmp_path).fit(model, from_ray(dataset, **options))
    assert "batch_size" in str(failure.value)
    assert_released()


@pytest.mark.usefixtures("nothing_idle")
def test_error_in_preprocessing_reaches_the_driver(tmp_path: Path) -> None:
    def broken(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise ValueError("bad row in preprocessing")

    started = time.monotonic()
    with pytest.raises(WorkerError, match="bad row in preprocessing"):
        _trainer(tmp_path).fit(RowRecordingModel(), from_ray(make_ray_dataset(64).map_batches(broken), batch_size=8))
    assert time.monotonic() - started < 240
    assert_released()


def test_missing_path_fails_with_ray_datas_error(tmp_path: Path) -> None:
    before = live_raylane_actors()
    with pytest.raises(Exception, match="does-not-exist"):
        _trainer(tmp_path).fit(
            RowRecordingModel(), from_ray(ray.data.read_parquet(str(tmp_path / "does-not-exist")), batch_size=8)
        )
    assert live_raylane_actors() == before, "no worker started"


@pytest.mark.usefixtures("nothing_idle")
def test_ray_data_plans_without_the_cpus_the_workers_hold(tmp_path: Path) -> None:
    notes = tmp_path / "excluded"
    notes.mkdir()

    def note_what_ray_data_excludes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Runs in Ray Data's map task, under the DataContext of the executor that planned it (the split's).
        excluded = ray.data.DataContext.get_current().execution_options.exclude_resources
        (notes / f"{os.getpid()}-{int(batch['id'][0])}.json").write_text(json.dumps(excluded.cpu))
        return batch

    dataset = make_ray_dataset(32).map_batches(note_what_ray_data_excludes)
    before = dataset.context.execution_options.exclude_resources
    # The workers hold 3 of the 4 CPUs: the pipeline still completes on the one left.
    trainer = _trainer(tmp_path, strategy=get_strategy("ddp", workers=2, cpus_per_worker=1.5), max_epochs=1)
    trainer.fit(RowRecordingModel(), from_ray(dataset, batch_size=8))

    assert trainer.global_step == 32 // (8 * 2)
    assert {json.loads(note.read_text()) for note in notes.iterdir()} == {3.0}, "the workers' 2 x 1.5 CPUs"
    assert dataset.context.execution_options.exclude_resources == before, "the user's Dataset is left as it was"


def test_workers_that_hold_every_cpu_fail_before_they_start(tmp_path: Path) -> None:
    cpus = int(ray.cluster_resources()["CPU"])
    before = live_raylane_actors()
    trainer = _trainer(tmp_path, strategy=get_strategy("ddp", workers=2, cpus_per_worker=cpus / 2))
    with pytest.raises(ConfigurationError, match="at least one more"):
        trainer.fit(RowRecordingModel(), from_ray(make_ray_dataset(16), batch_size=8))
    assert live_raylane_actors() == before, "no worker started"
