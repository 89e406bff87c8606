"""FSDP training against one plain Lightning process, and checkpoints resumed on other worker counts.

Every run trains the way users do: with a validation loader and Lightning's default sanity check. The references are
single processes that see the union of the workers' batches (``ReferenceSampler``). Module-scoped fixtures run each
fit once:

- ``adam_runs``: 2 workers for 4 epochs with a sharded checkpoint every epoch; 1 worker resuming from the 2-worker
  sharded checkpoint after epoch 2 (2 -> 1, writing a consolidated ``state_dict_type="full"`` file); 2 workers
  resuming from that file after epoch 3 (1 -> 2). Adam with a step LR schedule and gradient clipping by norm, so a
  resume must bring back the optimizer state and the learning rate, and clipping must see every rank's shard.
- ``sgd_run``: 2 workers, SGD, with activation checkpointing on every Linear.
- ``tensor_parallel_run``: 2 workers with ``tensor_parallel=2`` on a model whose ``configure_model`` applies torch's
  ``parallelize_module`` (column- then row-wise Linear layers); the strategy adds FSDP on the data-parallel dimension.

A predict_step that calls the layers directly instead of ``self(x)`` predicts the same as one process, from a
dataloader with a length and from a Ray Dataset (streamed, no length). A model built on the meta device comes back
trained to the driver. Layers that configure_model builds and shards itself, or builds on the meta device, keep their
trained weights for the next entry point, and so do the layers beside them. Manual optimization (two optimizers
stepped by hand, layers called directly) trains as one process does, and a step that computes with parameters FSDP
cannot gather around it is refused, saying what to do.
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
from torch import nn
from torch.utils.data import DataLoader

from raylane import ConfigurationError, get_strategy
from raylane.data import from_ray
from raylane.testing import (
    ClassifierModel,
    HeadBuiltInConfigureModel,
    ManuallyOptimizedClassifier,
    ReferenceSampler,
    TwoOptimizerClassifier,
    assert_released,
    ensure_local_ray,
    make_dataset,
)
from raylane.testing.equivalence import assert_validate_after_fit_sees_the_trained_head
from raylane.testing.ray_data import make_ray_dataset
from raylane_fsdp.checkpoint import load_full_checkpoint
from raylane_fsdp.sharding import materialize

pytestmark = pytest.mark.timeout(600)

SAMPLES = 64
GLOBAL_BATCH = 16
EPOCHS = 4
TOLERANCE = 1e-5
CLIP = 0.5  # Adam runs clip gradients by norm: the norm must cover every rank's shard of the gradients
QUIET: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
# Small enough that the two hidden Linear layers each become their own FSDP unit (the root takes the last one).
MIN_WRAP_PARAMS = 100


class MLPClassifier(ClassifierModel):
    """Three Linear layers; Adam with a learning rate that halves every epoch (``optimizer="adam"``)."""

    def __init__(self, optimizer: str = "adam", **kwargs: Any) -> None:
        super().__init__(optimizer=optimizer, lr=0.05, **kwargs)
        self.layer = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        # eps well above float noise: Adam divides by sqrt(v) + eps, so with the default 1e-8 a gradient element near
        # zero is amplified to a full-size step whose sign the summation order (all-reduce vs one process) decides.
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, eps=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class TensorParallelClassifier(MLPClassifier):
    """Applies tensor parallelism itself, as Lightning's ModelParallelStrategy documents; a plain Trainer has no
    device mesh and trains it unchanged."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam")
        self.layer = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(self.layer, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})


class ShardReport(pl.Callback):
    """Every rank writes how many parameter elements it holds locally, and its optimizer's learning rate."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        local = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in pl_module.parameters())
        report = {"local_params": local, "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        (Path(self.directory) / f"shards-rank{trainer.global_rank}.json").write_text(json.dumps(report))


class SaveAtEpochEnd(pl.Callback):
    """``trainer.save_checkpoint`` on every rank at the end of the given epochs (saving is a collective)."""

    def __init__(self, paths: dict[int, str]) -> None:
        self.paths = paths

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch in self.paths:
            trainer.save_checkpoint(self.paths[trainer.current_epoch])


def distributed_loader(workers: int) -> DataLoader:
    return DataLoader(make_dataset(samples=SAMPLES), batch_size=GLOBAL_BATCH // workers)


def reference_loader() -> DataLoader:
    return DataLoader(make_dataset(samples=SAMPLES), batch_size=GLOBAL_BATCH, sampler=ReferenceSampler(SAMPLES))


def val_loader() -> DataLoader:
    return DataLoader(make_dataset(samples=32, seed=1), batch_size=8)


def plain_fit(model: pl.LightningModule, epochs: int, directory: Path | None = None, **flags: Any) -> None:
    callbacks = [ModelCheckpoint(dirpath=str(directory), filename="{epoch}", save_top_k=-1)] if directory else []
    flags = {"callbacks": callbacks, "enable_checkpointing": bool(directory), **QUIET, **flags}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, **flags)
    trainer.fit(model, reference_loader(), val_loader())


def fsdp_trainer(workers: int, root: Path, epochs: int = EPOCHS, **options: Any) -> pl.Trainer:
    flags = {
        key: options.pop(key) for key in ("callbacks", "enable_checkpointing", "gradient_clip_val") if key in options
    }
    # idle_timeout=0: no workers stay behind for the next test (a predict after fit starts its own).
    strategy = get_strategy("fsdp", workers=workers, idle_timeout=0, min_wrap_params=MIN_WRAP_PARAMS, **options)
    return pl.Trainer(strategy=strategy, default_root_dir=str(root), max_epochs=epochs, **QUIET, **flags)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and actual[name].shape == value.shape, f"{what}: {name}"
        torch.testing.assert_close(
            actual[name], value, atol=TOLERANCE, rtol=0, msg=lambda m, n=name: f"{what}: {n}: {m}"
        )


@pytest.fixture(scope="module")
def initial() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(5)
    return {"mlp": weights(MLPClassifier()), "tp": weights(TensorParallelClassifier())}


def fresh(model_class: type[MLPClassifier], state: dict[str, torch.Tensor], **kwargs: Any) -> MLPClassifier:
    model = model_class(**kwargs)
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def adam_reference(initial: dict[str, dict[str, torch.Tensor]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process: checkpoints ``epoch=0.ckpt`` ... ``epoch=3.ckpt``."""
    directory = tmp_path_factory.mktemp("reference-adam")
    plain_fit(fresh(MLPClassifier, initial["mlp"]), EPOCHS, directory, gradient_clip_val=CLIP)
    return directory


@dataclass
class AdamRuns:
    two_workers: dict[str, torch.Tensor]
    fewer_workers: dict[str, torch.Tensor]  # 1 worker from the 2-worker sharded checkpoint after epoch 2
    more_workers: dict[str, torch.Tensor]  # 2 workers from the 1-worker consolidated file after epoch 3
    best_model_path: Path
    sharded_checkpoint: Path
    full_checkpoint: Path
    shard_reports: list[dict[str, Any]]


@pytest.fixture(scope="module")
def adam_runs(initial: dict[str, dict[str, torch.Tensor]], tmp_path_factory: pytest.TempPathFactory) -> AdamRuns:
    ensure_local_ray()
    root = tmp_path_factory.mktemp("fsdp-adam")
    two, one, two_again = root / "two", root / "one", root / "two-again"
    for directory in (two, one, two_again):
        directory.mkdir()

    model = fresh(MLPClassifier, initial["mlp"])
    every_epoch = ModelCheckpoint(dirpath=str(two), filename="{epoch}", save_top_k=-1)
    trainer = fsdp_trainer(2, two, callbacks=[every_epoch, ShardReport(str(two))], gradient_clip_val=CLIP)
    trainer.fit(model, distributed_loader(2), val_loader())
    two_workers, best = weights(model), Path(trainer.checkpoint_callback.best_model_path)

    model = fresh(MLPClassifier, initial["mlp"])  # the weights must come from the checkpoint
    full = one / "epoch=2.ckpt"
    trainer = fsdp_trainer(
        1,
        one,
        state_dict_type="full",
        callbacks=[SaveAtEpochEnd({2: str(full)})],
        enable_checkpointing=False,
        gradient_clip_val=CLIP,
    )
    trainer.fit(model, distributed_loader(1), val_loader(), ckpt_path=str(two / "epoch=1.ckpt"))
    fewer_workers = weights(model)

    model = fresh(MLPClassifier, initial["mlp"])
    trainer = fsdp_trainer(2, two_again, enable_checkpointing=False, gradient_clip_val=CLIP)
    trainer.fit(model, distributed_loader(2), val_loader(), ckpt_path=str(full))
    more_workers = weights(model)

    reports = [json.loads((two / f"shards-rank{rank}.json").read_text()) for rank in range(2)]
    return AdamRuns(two_workers, fewer_workers, more_workers, best, two / "epoch=1.ckpt", full, reports)


def final_weights(reference: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference / f"epoch={EPOCHS - 1}.ckpt", weights_only=False)["state_dict"]  # type: ignore[no-any-return]


def test_adam_on_two_workers_matches_one_process(adam_runs: AdamRuns, adam_reference: Path) -> None:
    assert_same_weights(adam_runs.two_workers, final_weights(adam_reference), "2 workers")


def test_each_worker_holds_half_of_the_parameters(adam_runs: AdamRuns, adam_reference: Path) -> None:
    total = sum(value.numel() for value in final_weights(adam_reference).values())
    held = [report["local_params"] for report in adam_runs.shard_reports]
    assert sum(held) == total and max(held) <= total // 2 + 16, f"shards of {total} parameters: {held}"
    assert [report["lr"] for report in adam_runs.shard_reports] == pytest.approx([0.05 * 0.5**EPOCHS] * 2)


def test_sharded_checkpoint_is_a_directory_of_shards_matching_one_process(
    adam_runs: AdamRuns, adam_reference: Path
) -> None:
    path = adam_runs.sharded_checkpoint
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    saved = load_full_checkpoint(path)
    expected = torch.load(adam_reference / "epoch=1.ckpt", weights_only=False)
    assert_same_weights(saved["state_dict"], expected["state_dict"], "sharded checkpoint after epoch 2")
    assert saved["epoch"] == 1 and saved["lr_schedulers"][0]["last_epoch"] == 2
    # The driver sees the checkpoint callback's paths, and the directory's files are there.
    assert adam_runs.best_model_path.is_dir() and (adam_runs.best_model_path / "meta.pt").is_file()


def test_resume_on_fewer_workers_from_a_sharded_checkpoint(adam_runs: AdamRuns, adam_reference: Path) -> None:
    assert_same_weights(adam_runs.fewer_workers, final_weights(adam_reference), "2 -> 1 workers (sharded checkpoint)")


def test_resume_on_more_workers_from_a_full_checkpoint(adam_runs: AdamRuns, adam_reference: Path) -> None:
    assert_same_weights(adam_runs.more_workers, final_weights(adam_reference), "1 -> 2 workers (full checkpoint)")


def test_full_checkpoint_is_one_file_like_a_plain_process_writes(adam_runs: AdamRuns, adam_reference: Path) -> None:
    saved = torch.load(adam_runs.full_checkpoint, weights_only=False)
    expected = torch.load(adam_reference / "epoch=2.ckpt", weights_only=False)
    assert_same_weights(saved["state_dict"], expected["state_dict"], "full checkpoint after epoch 3")
    [optimizer], [expected_optimizer] = saved["optimizer_states"], expected["optimizer_states"]
    assert sorted(optimizer["state"]) == sorted(expected_optimizer["state"])
    for index, state in expected_optimizer["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer["state"][index][key], state[key], atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def sgd_run(initial: dict[str, dict[str, torch.Tensor]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ensure_local_ray()
    model = fresh(MLPClassifier, initial["mlp"], optimizer="sgd")
    root = tmp_path_factory.mktemp("fsdp-sgd")
    trainer = fsdp_trainer(2, root, epochs=2, activation_checkpointing=nn.Linear, enable_checkpointing=False)
    trainer.fit(model, distributed_loader(2), val_loader())
    fitted = weights(model)
    # 65 samples in batches of 8: rank 0 gets 33 samples (5 batches), rank 1 gets 32 (4 batches).
    predictions = trainer.predict(model, predict_loader())
    reference = fresh(MLPClassifier, initial["mlp"], optimizer="sgd")
    plain_fit(reference, 2)
    return {"fsdp": fitted, "reference": weights(reference), "predictions": predictions, "reference_model": reference}


def predict_loader() -> DataLoader:
    return DataLoader(make_dataset(samples=65, seed=2), batch_size=8)


def expected_predictions(model: nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(inputs) for inputs, _ in predict_loader()]


def assert_same_predictions(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert [p.shape for p in actual] == [e.shape for e in expected], "every sample once, in batches of 8"
    torch.testing.assert_close(torch.cat(actual), torch.cat(expected), atol=1e-4, rtol=0)


def test_sgd_with_activation_checkpointing_matches_one_process(sgd_run: dict[str, Any]) -> None:
    assert_same_weights(sgd_run["fsdp"], sgd_run["reference"], "SGD, 2 workers, activation checkpointing")


def test_predict_with_a_batch_more_on_one_rank_returns_every_sample_in_order(sgd_run: dict[str, Any]) -> None:
    assert_same_predictions(sgd_run["predictions"], expected_predictions(sgd_run["reference_model"]))


def test_tensor_parallel_trains_and_predicts_like_one_process(
    initial: dict[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    ensure_local_ray()
    model = fresh(TensorParallelClassifier, initial["tp"])
    trainer = fsdp_trainer(2, tmp_path, epochs=2, tensor_parallel=2, enable_checkpointing=False)
    trainer.fit(model, DataLoader(make_dataset(samples=SAMPLES), batch_size=GLOBAL_BATCH), val_loader())
    fitted = weights(model)
    predictions = trainer.predict(model, predict_loader())  # both ranks predict every sample; one reports it
    reference = fresh(TensorParallelClassifier, initial["tp"])
    plain_fit(reference, 2)  # tensor-parallel ranks share batches: the reference batch is one rank's
    assert_same_weights(fitted, weights(reference), "tensor_parallel=2")
    assert_same_predictions(predictions, expected_predictions(reference))


class DirectCallClassifier(MLPClassifier):
    """predict_step calls its layers directly, never ``self(x)``: FSDP's forward hooks do not run for the root unit,
    which owns the last Linear layer here (the two others are units of their own)."""

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        if isinstance(batch, dict):  # from_ray
            return {"id": batch["id"], "output": self.layer(batch["x"])}
        return self.layer(batch[0])


def test_predict_step_that_calls_layers_directly_predicts_like_one_process(
    initial: dict[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    ensure_local_ray()
    model = fresh(DirectCallClassifier, initial["mlp"])
    strategy = get_strategy("fsdp", workers=2, idle_timeout=60, min_wrap_params=MIN_WRAP_PARAMS)
    trainer = pl.Trainer(strategy=strategy, default_root_dir=str(tmp_path), **QUIET)
    try:
        # A length: every rank runs the same number of steps (one repeats its last batch), each gathering the root.
        assert_same_predictions(trainer.predict(model, predict_loader()), expected_predictions(model))
        # Streamed, no length: the ranks run different numbers of steps on the whole, gathered model.
        streamed = trainer.predict(model, from_ray(make_ray_dataset(61), batch_size=8))
    finally:
        trainer.strategy.release_workers()  # type: ignore[attr-defined]
    inputs = {int(row["id"]): torch.as_tensor(row["x"]) for row in make_ray_dataset(61).iter_rows()}
    ids = torch.cat([batch["id"] for batch in streamed]).tolist()
    assert sorted(ids) == list(range(61)), "every row exactly once"
    with torch.no_grad():
        expected = model(torch.stack([inputs[i] for i in ids]))
    torch.testing.assert_close(torch.cat([batch["output"] for batch in streamed]), expected, atol=1e-4, rtol=0)
    assert_released()


def test_a_model_built_on_the_meta_device_comes_back_trained_and_validates_as_trained(tmp_path: Path) -> None:
    # trainer.init_module(empty_init=True) builds the driver's model on the meta device and each worker allocates only
    # its shard. The trained weights must still land in the driver's model: copied into meta tensors they vanished,
    # and a validate() after fit evaluated freshly initialised weights.
    ensure_local_ray()
    trainer = fsdp_trainer(2, tmp_path, epochs=2, enable_checkpointing=False)
    with trainer.init_module(empty_init=True):
        model = MLPClassifier()
    assert model.layer[0].weight.is_meta
    trainer.fit(model, distributed_loader(2), val_loader())
    after_fit = float(trainer.callback_metrics["val_loss"])
    assert not any(tensor.is_meta for tensor in model.state_dict().values()), "the driver holds the trained weights"
    [validated] = trainer.validate(model, val_loader())
    assert validated["val_loss"] == pytest.approx(after_fit, abs=1e-5), "validate() evaluates the trained model"
    assert_released()


class ShardsItsOwnHead(HeadBuiltInConfigureModel):
    """Lightning's pattern for models too big for one process: configure_model creates a layer and applies
    ``fully_shard`` itself, so each rank only ever holds its shard of it."""

    def configure_model(self) -> None:
        if hasattr(self, "head"):
            return
        from torch.distributed.fsdp import fully_shard

        self.head = nn.Linear(3, 3)
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.layer, mesh=mesh)
        fully_shard(self.head, mesh=mesh)


def test_layers_configure_model_builds_and_shards_keep_their_trained_weights_for_validate(tmp_path: Path) -> None:
    # The driver's model has no head to hold its trained weights; the next entry point's workers build it afresh and
    # shard it, and must then hold the trained head, each rank its own shard of it (as one process would keep it).
    ensure_local_ray()
    trainer = fsdp_trainer(2, tmp_path, epochs=1, enable_checkpointing=False)
    assert_validate_after_fit_sees_the_trained_head(trainer, ShardsItsOwnHead(), distributed_loader(2), val_loader())
    assert_released()


class BuildsItsHeadOnTheMetaDevice(HeadBuiltInConfigureModel):
    """The fsdp README's other way to build big layers: on the meta device in configure_model, next to layers built
    in ``__init__``; the strategy gives the head memory and initialises it."""

    def configure_model(self) -> None:
        if not hasattr(self, "head"):
            with torch.device("meta"):
                self.head = nn.Linear(3, 3)


def test_materialising_a_meta_head_keeps_the_trained_layers_beside_it(tmp_path: Path) -> None:
    # The next entry point's workers build the head on the meta device again; giving it memory re-initialised every
    # layer, so the trained layer the driver sent was evaluated as a fresh one (measured: val_loss 1.2110 instead of
    # the fit's 1.2159).
    ensure_local_ray()
    trainer = fsdp_trainer(2, tmp_path, epochs=1, enable_checkpointing=False)
    model = BuildsItsHeadOnTheMetaDevice()
    assert_validate_after_fit_sees_the_trained_head(trainer, model, distributed_loader(2), val_loader())
    assert_released()


def test_materialise_initialises_meta_tensors_and_leaves_the_others_as_they_are() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"))
    trained = model[0].weight.detach().clone()
    materialize(model, torch.device("cpu"))
    assert not any(tensor.is_meta for tensor in model.parameters())
    assert torch.equal(model[0].weight, trained)
    assert model[1].weight.abs().sum() > 0, "the meta layer is initialised (reset_parameters), not left empty"


def test_two_optimizers_stepped_by_hand_on_layers_called_directly_match_one_process(tmp_path: Path) -> None:
    # A GAN's loop: training_step calls each head directly and runs its backward and optimizer step itself. With the
    # step registered as the root unit's forward (as for automatic optimization), FSDP2 reduced no gradient of those
    # backward passes and the fit left every weight where it started.
    ensure_local_ray()
    torch.manual_seed(5)
    model = TwoOptimizerClassifier()
    reference = TwoOptimizerClassifier()
    reference.load_state_dict(model.state_dict())
    plain_fit(reference, 2)
    fsdp_trainer(2, tmp_path, epochs=2, enable_checkpointing=False).fit(model, distributed_loader(2), val_loader())
    assert_same_weights(weights(model), weights(reference), "two optimizers stepped by hand")
    assert_released()


class ScalesWithItsOwnParameter(ManuallyOptimizedClassifier):
    """Manual optimization whose step uses a parameter the LightningModule registers on itself, outside forward()."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self.layer(inputs) * self.scale, targets)
        self.manual_backward(loss)
        return loss


def test_a_manual_step_computing_with_the_roots_own_parameter_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    ensure_local_ray()
    trainer = fsdp_trainer(2, tmp_path, epochs=1, enable_checkpointing=False)
    with pytest.raises(ConfigurationError, match=r"registers on\s+itself .* use them in forward\(\) and call self"):
        trainer.fit(ScalesWithItsOwnParameter(), distributed_loader(2))
    assert_released()
