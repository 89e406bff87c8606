"""ZeRO training on CPU workers against one plain Lightning process, and DeepSpeed's checkpoint directories.

Stage 2 (the default) is compared with one process, with SGD and Adam and with accumulated gradients, by the
conformance suite; here stage 3 with both, stage 1 with Adam (SGD keeps no optimizer state to shard), and ZeRO-3 with
optimizer and parameter offload, with Adam and with SGD over accumulated gradients, all trained as users train (a
validation loader and the default sanity check). Then a ZeRO-3 checkpoint: what reaches the driver, a validate() from
it, and a resume from it that lands on the weights of an uninterrupted run. A layer configure_model builds inside
ZeRO-3's partitioning keeps its trained weights for the next entry point. Last, the settings refused with a message
saying what to pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from torch import nn
from torch.utils.data import DataLoader

from raylane import ConfigurationError, WorkerError, get_strategy
from raylane.testing import (
    ClassifierModel,
    HeadBuiltInConfigureModel,
    assert_released,
    ensure_local_ray,
    make_dataset,
    make_loader,
)
from raylane.testing.equivalence import (
    QUIET,
    VALIDATION_SAMPLES,
    assert_same_weights,
    assert_validate_after_fit_sees_the_trained_head,
    distributed_loader,
    fit_distributed,
    fit_one_process,
    validation_loader,
)
from raylane_deepspeed.checkpoints import consolidated_state_dict

pytestmark = pytest.mark.timeout(600)

WORKERS = 2
GLOBAL_BATCH = 32
SAMPLES = 128
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _ray() -> None:
    ensure_local_ray()


def ray_trainer(root: Path, options: dict[str, Any], **flags: Any) -> pl.Trainer:
    strategy = get_strategy("deepspeed", workers=WORKERS, idle_timeout=0, **options)  # the next fit needs the CPUs
    defaults = {"max_epochs": 2, "default_root_dir": str(root), "enable_checkpointing": False, **QUIET}
    return pl.Trainer(strategy=strategy, **{**defaults, **flags})


# 4 batches an epoch: steps after 3 and after the last. With SGD, whose step shows a gradient divided twice.
ACCUMULATE = {"accumulate_grad_batches": 3}


@pytest.mark.parametrize(
    ("options", "optimizer", "flags"),
    [
        ({"stage": 1}, "adam", {}),
        ({"stage": 3}, "sgd", {}),
        ({"stage": 3}, "adam", {}),
        ({"stage": 3, "offload_optimizer": True, "offload_parameters": True}, "adam", {}),
        ({"stage": 3, "offload_optimizer": True, "offload_parameters": True}, "sgd", ACCUMULATE),
    ],
    ids=["zero1-adam", "zero3-sgd", "zero3-adam", "zero3-offload-adam", "zero3-offload-sgd-accumulated"],
)
def test_same_weights_as_one_process(
    tmp_path: Path, options: dict[str, Any], optimizer: str, flags: dict[str, Any]
) -> None:
    torch.manual_seed(5)
    distributed = ClassifierModel(optimizer=optimizer, report_dir=str(tmp_path), report_env=("DS_ACCELERATOR",))
    single = ClassifierModel(optimizer=optimizer)
    single.load_state_dict(distributed.state_dict())
    dataset = make_dataset(samples=SAMPLES)
    actual = fit_distributed(ray_trainer(tmp_path, options, **flags), distributed, dataset, GLOBAL_BATCH)
    expected = fit_one_process(single, dataset, GLOBAL_BATCH, max_epochs=2, **flags)
    assert_same_weights(actual, expected, atol=TOLERANCE, what=f"deepspeed {options}, {optimizer}, {flags}")
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("fit-rank*.json"))]
    assert [r["env"]["DS_ACCELERATOR"] for r in reports] == ["cpu"] * WORKERS, "DeepSpeed's CPU accelerator"


def test_zero3_checkpoints_reach_the_driver_and_resume(tmp_path: Path) -> None:
    torch.manual_seed(9)
    interrupted = ClassifierModel(optimizer="adam")
    initial = {name: value.clone() for name, value in interrupted.state_dict().items()}
    dataset = make_dataset(samples=SAMPLES)
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{epoch}", save_top_k=-1)
    trainer = ray_trainer(tmp_path / "a", {"stage": 3}, enable_checkpointing=True, callbacks=[every_epoch])
    two_epochs = fit_distributed(trainer, interrupted, dataset, GLOBAL_BATCH)

    # One directory per checkpoint: the optimizer and weight shards of every rank, under Lightning's tag.
    directory = Path(trainer.checkpoint_callback.best_model_path)  # type: ignore[union-attr]
    assert directory == tmp_path / "ckpt" / "epoch=1.ckpt" and directory.is_dir()
    shards = sorted(p.name for p in (directory / "checkpoint").iterdir())
    assert sum("optim_states" in name for name in shards) == WORKERS, shards
    assert_same_weights(consolidated_state_dict(directory), two_epochs, atol=0, what="ZeRO-3 checkpoint")

    # One file a plain Lightning process loads, from DeepSpeed's directory (Lightning's converter).
    single_file = tmp_path / "consolidated.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(str(directory), str(single_file))
    plain = ClassifierModel.load_from_checkpoint(single_file, optimizer="adam")
    assert_same_weights(plain.state_dict(), two_epochs, atol=0, what="consolidated single file")

    # trainer.save_checkpoint on the driver writes one plain file: the weights, without the workers' optimizer state.
    with pytest.warns(UserWarning, match="no optimizer"):
        trainer.save_checkpoint(tmp_path / "driver.ckpt")
    from_driver = ClassifierModel.load_from_checkpoint(tmp_path / "driver.ckpt", optimizer="adam")
    assert_same_weights(from_driver.state_dict(), two_epochs, atol=0, what="driver-side save_checkpoint")

    # validate() given epoch 0's directory evaluates its weights (DeepSpeed's engine cannot load a ZeRO-3 checkpoint
    # without an optimizer) and, as in one process, leaves them in the model.
    epoch_0 = tmp_path / "ckpt" / "epoch=0.ckpt"
    here = ClassifierModel()
    here.load_state_dict(consolidated_state_dict(epoch_0))
    inputs, targets = next(iter(DataLoader(validation_loader().dataset, batch_size=VALIDATION_SAMPLES)))
    with torch.no_grad():
        expected_loss = nn.functional.cross_entropy(here(inputs), targets).item()
    [validated] = trainer.validate(interrupted, validation_loader(), ckpt_path=str(epoch_0))
    assert validated["val_loss"] == pytest.approx(expected_loss, abs=1e-5), "validate() evaluates epoch 0's weights"
    assert_same_weights(interrupted.state_dict(), here.state_dict(), atol=0, what="the model after validate(ckpt_path)")

    # Resuming from epoch 1's directory restores Adam's state: epochs 2-3 land where four uninterrupted epochs do.
    resumed = ClassifierModel(optimizer="adam")
    resumed.load_state_dict(initial)  # the weights must come from the checkpoint
    trainer = ray_trainer(tmp_path / "b", {"stage": 3}, max_epochs=4)
    after_resume = fit_distributed(trainer, resumed, dataset, GLOBAL_BATCH, ckpt_path=str(directory))
    uninterrupted = ClassifierModel(optimizer="adam")
    uninterrupted.load_state_dict(initial)
    expected = fit_one_process(uninterrupted, dataset, GLOBAL_BATCH, max_epochs=4)
    assert_same_weights(after_resume, expected, atol=TOLERANCE, what="ZeRO-3 resumed from its directory")


def test_a_layer_configure_model_builds_under_zero3_keeps_its_trained_weights_for_validate(tmp_path: Path) -> None:
    # Under ZeRO-3, configure_model runs inside deepspeed.zero.Init: the workers' fresh head is partitioned before
    # the trained weights the driver could not hold are copied in, so the copy must gather it first.
    model = HeadBuiltInConfigureModel(optimizer="adam")
    trainer = ray_trainer(tmp_path, {"stage": 3}, max_epochs=1)
    assert_validate_after_fit_sees_the_trained_head(trainer, model, make_loader(8), validation_loader())
    assert_released()


def test_clipping_by_value_is_rejected_before_any_actor_starts(tmp_path: Path) -> None:
    trainer = ray_trainer(tmp_path, {}, gradient_clip_val=1.0, gradient_clip_algorithm="value")
    with pytest.raises(ConfigurationError, match="clips gradients by norm only"):
        trainer.fit(ClassifierModel(), distributed_loader(make_dataset(), GLOBAL_BATCH, WORKERS), validation_loader())


def test_an_accumulation_schedule_is_rejected_before_any_actor_starts(tmp_path: Path) -> None:
    trainer = ray_trainer(tmp_path, {}, callbacks=[GradientAccumulationScheduler({0: 1, 1: 3})])
    with pytest.raises(ConfigurationError, match="one accumulate_grad_batches for the whole fit"):
        trainer.fit(ClassifierModel(), distributed_loader(make_dataset(), GLOBAL_BATCH, WORKERS), validation_loader())
    assert_released()


def test_a_learning_rate_search_is_refused_before_any_actor_starts_saying_what_to_use(tmp_path: Path) -> None:
    from pytorch_lightning.tuner import Tuner

    trainer = ray_trainer(tmp_path, {})
    with pytest.raises(
        ConfigurationError, match=r"cannot search on the deepspeed backend: .* Search with the ddp backend"
    ):
        Tuner(trainer).lr_find(ClassifierModel(), distributed_loader(make_dataset(), GLOBAL_BATCH, WORKERS))
    assert_released()


def test_fp16_on_cpus_without_fp16_kernels_says_what_to_train_with(tmp_path: Path) -> None:
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this CPU has fp16 kernels, and DeepSpeed trains in fp16 on it")
    trainer = ray_trainer(tmp_path, {}, precision="16-mixed")
    with pytest.raises(WorkerError, match=r"precision='16-mixed'.*Trainer\(precision='bf16-mixed'\)") as raised:
        trainer.fit(ClassifierModel(), distributed_loader(make_dataset(samples=32), GLOBAL_BATCH, WORKERS))
    assert isinstance(raised.value.__cause__, ConfigurationError), "raised by raylane, before DeepSpeed's own check"
    assert_released()
