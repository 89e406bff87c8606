"""Sharded training against references: one process, the DDP backend, and resumed runs on other worker counts.

One uninterrupted reference (a single process with the union batch) and, per engine, three sharded fits chained
through their checkpoints: 2 workers for 4 epochs (checkpoint every epoch), 1 worker resuming from the 2-worker
checkpoint after epoch 2 (2 -> 1), and 2 workers resuming from the 1-worker checkpoint after epoch 3 (1 -> 2). The
model uses Adam with a step LR schedule, gradient clipping by norm and gradient accumulation, so a resume must
restore the optimizer state and the learning rate, clipping must see every rank's gradients, and accumulation must
skip the reduction until the last micro-batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from raylane import get_strategy
from raylane.testing import (
    QUIET,
    ClassifierModel,
    assert_same_weights,
    ensure_local_ray,
    make_dataset,
    validation_loader,
)
from raylane.testing.equivalence import distributed_loader, one_process_trainer, reference_loader
from raylane_sharded.optimizers import local_state_bytes

pytestmark = pytest.mark.timeout(600)

ENGINES = ["fairscale", "zero"]
SAMPLES = 128
GLOBAL_BATCH = 32
EPOCHS = 4
CLIP = 0.05  # small enough that every step is clipped
ACCUMULATE = 2  # micro-batches per optimizer step
TOLERANCE = 1e-6
SAME_STEPS: dict[str, Any] = {"max_epochs": EPOCHS, "gradient_clip_val": CLIP, "accumulate_grad_batches": ACCUMULATE}


class ScheduledClassifier(ClassifierModel):
    """Adam whose learning rate halves every epoch: the state a resume must bring back."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class SaveAtEpochEnd(pl.Callback):
    """``trainer.save_checkpoint`` on every rank at the end of the given epochs (consolidation is a collective)."""

    def __init__(self, paths: dict[int, str]) -> None:
        self.paths = paths

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch in self.paths:
            trainer.save_checkpoint(self.paths[trainer.current_epoch])


class ShardReport(pl.Callback):
    """Every rank writes what it holds of the optimizer at the end of fit."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        report = {
            "optimizer": type(optimizer).__name__,
            "local_state_bytes": local_state_bytes(optimizer),
            "lr": float(optimizer.param_groups[0]["lr"]),
        }
        (Path(self.directory) / f"shard-rank{trainer.global_rank}.json").write_text(json.dumps(report))


@dataclass
class ShardedRuns:
    engine: str
    uninterrupted: dict[str, torch.Tensor]  # 2 workers, epochs 0-3
    fewer_workers: dict[str, torch.Tensor]  # 1 worker resuming after epoch 2 of the 2-worker run
    more_workers: dict[str, torch.Tensor]  # 2 workers resuming after epoch 3 of the 1-worker run
    checkpoints: dict[str, Path]
    shard_reports: list[dict[str, Any]]


@pytest.fixture(scope="module")
def initial_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    return {name: value.clone() for name, value in ScheduledClassifier().state_dict().items()}


def fresh_model(weights: dict[str, torch.Tensor]) -> ScheduledClassifier:
    model = ScheduledClassifier()
    model.load_state_dict(weights)
    return model


def train_loader(workers: int | None = None) -> DataLoader:
    """A rank's loader for ``workers`` ranks, or (None) one process's loader with the union batch."""
    dataset = make_dataset(samples=SAMPLES)
    return (
        reference_loader(dataset, GLOBAL_BATCH)
        if workers is None
        else distributed_loader(dataset, GLOBAL_BATCH, workers)
    )


def plain_trainer(**flags: Any) -> pl.Trainer:
    return one_process_trainer(**SAME_STEPS, **flags)


def ray_trainer(workers: int, engine: str, root: Path, **flags: Any) -> pl.Trainer:
    strategy = get_strategy("sharded", workers=workers, engine=engine, idle_timeout=0)  # the next fit needs the CPUs
    return pl.Trainer(strategy=strategy, default_root_dir=str(root), **SAME_STEPS, **QUIET, **flags)


def every_epoch(directory: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=str(directory), filename="{epoch}", save_top_k=-1, every_n_epochs=1)


@pytest.fixture(scope="module")
def reference(initial_weights: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, union batch, no sharding: checkpoints ``epoch=0.ckpt`` ... ``epoch=3.ckpt``."""
    directory = tmp_path_factory.mktemp("reference")
    model = fresh_model(initial_weights)
    trainer = plain_trainer(callbacks=[every_epoch(directory)], enable_checkpointing=True)
    trainer.fit(model, train_loader(), validation_loader())
    return directory


@pytest.fixture(scope="module", params=ENGINES)
def sharded(
    request: pytest.FixtureRequest, initial_weights: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
) -> ShardedRuns:
    ensure_local_ray()
    engine = request.param
    root = tmp_path_factory.mktemp(f"sharded-{engine}")
    two, one, resumed_two = root / "two-workers", root / "one-worker", root / "two-again"
    for directory in (two, one, resumed_two):
        directory.mkdir()

    model = fresh_model(initial_weights)
    trainer = ray_trainer(2, engine, two, callbacks=[every_epoch(two), ShardReport(str(two))])
    trainer.fit(model, train_loader(2), validation_loader())
    uninterrupted = {name: value.clone() for name, value in model.state_dict().items()}

    model = fresh_model(initial_weights)  # the weights must come from the checkpoint, not from this module
    paths = {2: str(one / "epoch=2.ckpt"), 3: str(one / "epoch=3.ckpt")}
    trainer = ray_trainer(1, engine, one, callbacks=[SaveAtEpochEnd(paths)], enable_checkpointing=False)
    trainer.fit(model, train_loader(1), validation_loader(), ckpt_path=str(two / "epoch=1.ckpt"))
    fewer_workers = {name: value.clone() for name, value in model.state_dict().items()}

    model = fresh_model(initial_weights)
    trainer = ray_trainer(2, engine, resumed_two, callbacks=[every_epoch(resumed_two)])
    trainer.fit(model, train_loader(2), validation_loader(), ckpt_path=paths[2])
    more_workers = {name: value.clone() for name, value in model.state_dict().items()}

    reports = [json.loads((two / f"shard-rank{rank}.json").read_text()) for rank in range(2)]
    checkpoints = {
        "two_workers_epoch1": two / "epoch=1.ckpt",
        "two_workers_epoch3": two / "epoch=3.ckpt",
        "one_worker_epoch3": Path(paths[3]),
        "two_again_epoch3": resumed_two / "epoch=3.ckpt",
    }
    return ShardedRuns(engine, uninterrupted, fewer_workers, more_workers, checkpoints, reports)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)  # type: ignore[no-any-return]


def assert_same_optimizer_state(actual: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    """The whole optimizer state, as an ordinary torch optimizer's state_dict holds it."""
    assert sorted(actual["state"]) == sorted(expected["state"]), f"{what}: state for every parameter"
    for index, expected_state in expected["state"].items():
        assert actual["state"][index].keys() == expected_state.keys(), f"{what}: parameter {index}"
        for key, value in expected_state.items():
            torch.testing.assert_close(
                actual["state"][index][key], value, atol=TOLERANCE, rtol=0, msg=lambda m, k=key: f"{what}: {k}: {m}"
            )
    assert [g["lr"] for g in actual["param_groups"]] == pytest.approx([g["lr"] for g in expected["param_groups"]])
    assert [g["params"] for g in actual["param_groups"]] == [g["params"] for g in expected["param_groups"]]


def final_weights(reference: Path) -> dict[str, torch.Tensor]:
    return load(reference / "epoch=3.ckpt")["state_dict"]  # type: ignore[no-any-return]


def test_checkpoint_holds_the_whole_consolidated_optimizer_state(sharded: ShardedRuns, reference: Path) -> None:
    saved = load(sharded.checkpoints["two_workers_epoch1"])
    expected = load(reference / "epoch=1.ckpt")
    assert_same_optimizer_state(saved["optimizer_states"][0], expected["optimizer_states"][0], "after epoch 2")
    assert saved["lr_schedulers"][0]["last_epoch"] == expected["lr_schedulers"][0]["last_epoch"]


def test_optimizer_state_is_sharded_across_workers(sharded: ShardedRuns, reference: Path) -> None:
    expected_class = {"fairscale": "OSS", "zero": "ZeroRedundancyOptimizer"}[sharded.engine]
    assert [report["optimizer"] for report in sharded.shard_reports] == [expected_class] * 2
    held = [report["local_state_bytes"] for report in sharded.shard_reports]
    total = sum(
        value.numel() * value.element_size()
        for state in load(reference / "epoch=3.ckpt")["optimizer_states"][0]["state"].values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    assert all(0 < part < total for part in held), f"each rank holds a shard, not all of {total} bytes: {held}"
    assert sum(held) == total
    # The LR schedule reached the sharded optimizer, on every rank.
    expected_lr = load(reference / "epoch=3.ckpt")["optimizer_states"][0]["param_groups"][0]["lr"]
    assert [report["lr"] for report in sharded.shard_reports] == pytest.approx([expected_lr] * 2)


def test_same_weights_as_one_process_with_clipping_and_schedule(sharded: ShardedRuns, reference: Path) -> None:
    assert_same_weights(
        sharded.uninterrupted, final_weights(reference), atol=TOLERANCE, what="2 workers, uninterrupted"
    )
    saved = load(sharded.checkpoints["two_workers_epoch3"])
    assert_same_optimizer_state(
        saved["optimizer_states"][0], load(reference / "epoch=3.ckpt")["optimizer_states"][0], "2 workers, end"
    )


def test_resume_on_fewer_workers_restores_the_optimizer(sharded: ShardedRuns, reference: Path) -> None:
    assert_same_weights(sharded.fewer_workers, final_weights(reference), atol=TOLERANCE, what="2 -> 1 workers")
    saved = load(sharded.checkpoints["one_worker_epoch3"])
    assert_same_optimizer_state(
        saved["optimizer_states"][0], load(reference / "epoch=3.ckpt")["optimizer_states"][0], "2 -> 1 workers"
    )


def test_resume_on_more_workers_restores_the_optimizer(sharded: ShardedRuns, reference: Path) -> None:
    assert_same_weights(sharded.more_workers, final_weights(reference), atol=TOLERANCE, what="1 -> 2 workers")
    saved = load(sharded.checkpoints["two_again_epoch3"])
    assert_same_optimizer_state(
        saved["optimizer_states"][0], load(reference / "epoch=3.ckpt")["optimizer_states"][0], "1 -> 2 workers"
    )


def test_checkpoint_resumes_in_a_plain_single_process_trainer(
    sharded: ShardedRuns, reference: Path, initial_weights: dict[str, torch.Tensor]
) -> None:
    model = fresh_model(initial_weights)
    trainer = plain_trainer(enable_checkpointing=False)
    trainer.fit(model, train_loader(), validation_loader(), ckpt_path=str(sharded.checkpoints["two_workers_epoch1"]))
    assert_same_weights(
        model.state_dict(), final_weights(reference), atol=TOLERANCE, what="sharded checkpoint -> one process"
    )
    assert_same_optimizer_state(
        trainer.optimizers[0].state_dict(),
        load(reference / "epoch=3.ckpt")["optimizer_states"][0],
        "sharded checkpoint -> one process",
    )


@pytest.fixture(scope="module")
def ddp_weights(initial_weights: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ensure_local_ray()  # the ddp backend is installed in this backend's nox session, to compare against
    model = fresh_model(initial_weights)
    strategy = get_strategy("ddp", workers=2, idle_timeout=0)
    root = tmp_path_factory.mktemp("ddp")
    trainer = pl.Trainer(
        strategy=strategy, default_root_dir=str(root), enable_checkpointing=False, **SAME_STEPS, **QUIET
    )
    trainer.fit(model, train_loader(2), validation_loader())
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_same_weights_as_the_ddp_backend(sharded: ShardedRuns, ddp_weights: dict[str, torch.Tensor]) -> None:
    assert_same_weights(sharded.uninterrupted, ddp_weights, atol=TOLERANCE, what=f"sharded ({sharded.engine}) vs ddp")
