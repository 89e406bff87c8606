"""Horovod training against references, beyond the conformance suite.

- Adam with a step LR schedule, gradient clipping by norm and gradient accumulation: the same weights as one process
  with the union batch and as the ddp backend, from the same initial weights. Clipping must see averaged gradients
  and accumulation must defer the allreduce to the last micro-batch.
- Two optimizers with two LR schedulers (manual optimization): the same weights as one process.
- The options reach Horovod: ``op="sum"`` adds the workers' gradients (one process with twice the learning rate).
- Collectives and logging on the workers: ``sync_dist`` means, all_gather, broadcast, reduce, boolean decisions,
  Horovod's ranks and environment, across two entry points on the same warm workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from raylane import get_strategy
from raylane.testing import (
    QUIET,
    ClassifierModel,
    TwoOptimizerClassifier,
    assert_same_weights,
    ensure_local_ray,
    fit_one_process,
    make_dataset,
    make_loader,
    validation_loader,
)
from raylane.testing.equivalence import distributed_loader

hvd = pytest.importorskip("horovod.torch", reason="Horovod is not installed; see backends/horovod/README.md")

SAMPLES = 128
GLOBAL_BATCH = 32
WORKERS = 2
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def _ray() -> None:
    ensure_local_ray()


class ScheduledClassifier(ClassifierModel):
    """Adam whose learning rate halves every epoch."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def fit_distributed(model: pl.LightningModule, backend: str, root: Path, **flags: Any) -> dict[str, torch.Tensor]:
    """Trained as users train: with a validation loader and Lightning's default sanity check."""
    strategy = get_strategy(backend, workers=WORKERS, idle_timeout=0)  # the next fit needs the CPUs
    trainer = pl.Trainer(strategy=strategy, default_root_dir=str(root), enable_checkpointing=False, **QUIET, **flags)
    trainer.fit(model, distributed_loader(make_dataset(samples=SAMPLES), GLOBAL_BATCH, WORKERS), validation_loader())
    return model.state_dict()


def fit_reference(model: pl.LightningModule, **flags: Any) -> dict[str, torch.Tensor]:
    return fit_one_process(model, make_dataset(samples=SAMPLES), GLOBAL_BATCH, **flags)


def copy_of(model: pl.LightningModule, factory: Any = None) -> pl.LightningModule:
    twin = (factory or type(model))()
    twin.load_state_dict(model.state_dict())
    return twin


SCHEDULED_FLAGS: dict[str, Any] = {"max_epochs": 2, "gradient_clip_val": 0.05, "accumulate_grad_batches": 2}


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """Initial weights, one process and the horovod backend, for Adam + StepLR + clipping + accumulation."""
    ensure_local_ray()
    torch.manual_seed(11)
    model = ScheduledClassifier()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    reference = fit_reference(copy_of(model), **SCHEDULED_FLAGS)
    horovod = fit_distributed(model, "horovod", tmp_path_factory.mktemp("horovod"), **SCHEDULED_FLAGS)
    return {"initial": initial, "reference": reference, "horovod": horovod}


def test_clipped_accumulated_scheduled_adam_matches_one_process(scheduled: dict[str, dict[str, Any]]) -> None:
    assert not torch.equal(scheduled["horovod"]["layer.weight"], scheduled["initial"]["layer.weight"])
    assert_same_weights(scheduled["horovod"], scheduled["reference"], atol=TOLERANCE, what="horovod vs one process")


def test_clipped_accumulated_scheduled_adam_matches_ddp(scheduled: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    model = ScheduledClassifier()
    model.load_state_dict(scheduled["initial"])
    ddp = fit_distributed(model, "ddp", tmp_path, **SCHEDULED_FLAGS)
    assert_same_weights(scheduled["horovod"], ddp, atol=TOLERANCE, what="horovod vs ddp")


def test_two_optimizers_with_schedulers_match_one_process(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = TwoOptimizerClassifier()
    reference = fit_reference(copy_of(model), max_epochs=2)
    assert_same_weights(
        fit_distributed(model, "horovod", tmp_path, max_epochs=2), reference, atol=TOLERANCE, what="two optimizers"
    )


def test_op_sum_adds_the_workers_gradients(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = ClassifierModel(lr=0.05)
    reference = fit_reference(copy_of(model, lambda: ClassifierModel(lr=0.05 * WORKERS)), max_epochs=1)
    strategy = get_strategy("horovod", workers=WORKERS, op="sum", idle_timeout=0)
    trainer = pl.Trainer(strategy=strategy, default_root_dir=str(tmp_path), max_epochs=1, **QUIET)
    trainer.fit(model, distributed_loader(make_dataset(samples=SAMPLES), GLOBAL_BATCH, WORKERS), validation_loader())
    assert_same_weights(model.state_dict(), reference, atol=TOLERANCE, what="op='sum' vs twice the learning rate")


class CollectivesReport(ClassifierModel):
    """Every rank runs each collective at the end of validation and writes what it got."""

    def on_validation_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        rank = self.global_rank
        self.log("rank_mean", float(rank), sync_dist=True)
        report = {
            "pid": os.getpid(),
            "horovod": [hvd.rank(), hvd.size(), hvd.local_rank(), hvd.cross_size()],
            "env": {name: value for name, value in os.environ.items() if name.startswith("HOROVOD_")},
            "gathered": self.all_gather(torch.tensor([rank, 10 * rank])).tolist(),
            "broadcast": strategy.broadcast({"from": rank}, src=1),
            "sum": strategy.reduce(torch.tensor(rank + 1.0), reduce_op="sum").item(),
            "max": strategy.reduce(torch.tensor(rank + 1.0), reduce_op="max").item(),
            "int_mean": strategy.reduce(torch.tensor(rank + 1)).item(),
            "all_agree": strategy.reduce_boolean_decision(rank == 0),
            "any_agrees": strategy.reduce_boolean_decision(rank == 0, all=False),
        }
        strategy.barrier()
        run = len(list(Path(self.hparams.report_dir).glob(f"*-rank{rank}.json")))
        (Path(self.hparams.report_dir) / f"run{run}-rank{rank}.json").write_text(json.dumps(report))


def test_collectives_and_sync_dist_logging_across_entry_points(tmp_path: Path) -> None:
    model = CollectivesReport(report_dir=str(tmp_path))
    strategy = get_strategy("horovod", workers=WORKERS, collective_timeout=60, idle_timeout=60)
    trainer = pl.Trainer(strategy=strategy, default_root_dir=str(tmp_path), **QUIET)
    for _ in range(2):  # the second entry point re-initialises Horovod on the same warm workers
        [metrics] = trainer.validate(model, make_loader(8))
        assert metrics["rank_mean"] == pytest.approx(0.5)
    strategy.release_workers()  # type: ignore[attr-defined]
    reports = {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("run*-rank*.json")}
    assert sorted(reports) == ["run0-rank0", "run0-rank1", "run1-rank0", "run1-rank1"]
    assert reports["run0-rank0"]["pid"] == reports["run1-rank0"]["pid"], "the same warm worker ran both"
    for name, report in reports.items():
        rank = int(name[-1])
        assert report["horovod"] == [rank, WORKERS, rank, 1]
        assert report["env"]["HOROVOD_CONTROLLER"] == "gloo"
        assert report["env"]["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "48"  # 60 s minus two 6 s checks
        assert report["gathered"] == [[0, 0], [1, 10]]
        assert report["broadcast"] == {"from": 1}
        assert (report["sum"], report["max"], report["int_mean"]) == (3.0, 2.0, 1.5)
        assert (report["all_agree"], report["any_agrees"]) == (False, True)
