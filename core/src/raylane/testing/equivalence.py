"""Same weights as one process: the references a distributed fit is compared with, trained the way users train.

Every fit here gets a validation loader and keeps Lightning's default sanity check. Both switch the model between
train and eval mode around validation, which a wrapper such as FairScale's ShardedDataParallel once got wrong (it
stopped reducing gradients after the first validation): an equivalence check without them cannot see such bugs.

A distributed fit with per-rank batches of ``global_batch / workers`` and Lightning's shuffled DistributedSampler
takes the same steps as one process with batches of ``global_batch`` drawn through :class:`ReferenceSampler`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from raylane import get_strategy
from raylane.errors import WeightsNotOnDriverWarning, WorkerError
from raylane.testing.models import HeadBuiltInConfigureModel, ReferenceSampler, TwoOptimizerClassifier, make_dataset
from raylane.testing.trainers import QUIET

VALIDATION_SAMPLES = 32


def validation_loader(batch_size: int = 8) -> DataLoader:
    """Validation data unlike the training data (another seed), as a user's held-out set is."""
    return DataLoader(make_dataset(samples=VALIDATION_SAMPLES, seed=1), batch_size=batch_size)


def distributed_loader(dataset: Dataset, global_batch: int, workers: int) -> DataLoader:
    """Each rank's loader: Lightning adds its DistributedSampler on the workers."""
    if global_batch % workers:
        raise ValueError(f"global_batch={global_batch} must divide among {workers} workers")
    return DataLoader(dataset, batch_size=global_batch // workers)


def reference_loader(dataset: Dataset, global_batch: int) -> DataLoader:
    """One process's loader whose batches are the union of the ranks' batches at every step."""
    return DataLoader(dataset, batch_size=global_batch, sampler=ReferenceSampler(len(dataset)))  # type: ignore[arg-type]


def one_process_trainer(**flags: Any) -> pl.Trainer:
    """A plain Lightning Trainer on one CPU process, with the default sanity check."""
    return pl.Trainer(**{"accelerator": "cpu", "devices": 1, "enable_checkpointing": False, **QUIET, **flags})


def fit_one_process(
    model: pl.LightningModule, dataset: Dataset, global_batch: int, **flags: Any
) -> dict[str, torch.Tensor]:
    """Fit ``model`` in this process with the union batch and a validation loader; return a copy of its weights."""
    one_process_trainer(**flags).fit(model, reference_loader(dataset, global_batch), validation_loader())
    return weights_of(model)


def fit_distributed(
    trainer: pl.Trainer, model: pl.LightningModule, dataset: Dataset, global_batch: int, **fit_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Fit ``model`` with ``trainer`` (a raylane strategy) and a validation loader; return a copy of its weights."""
    workers = trainer.strategy.launch_options.workers  # type: ignore[attr-defined]
    trainer.fit(model, distributed_loader(dataset, global_batch, workers), validation_loader(), **fit_kwargs)
    return weights_of(model)


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_weights(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, atol: float, what: str
) -> None:
    """Every tensor of ``expected`` is in ``actual`` within ``atol`` (absolute); the message names the tensor."""
    assert actual.keys() == expected.keys(), f"{what}: different tensors: {sorted(actual)} vs {sorted(expected)}"
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=lambda m, n=name: f"{what}: {n}: {m}")


def assert_validate_after_fit_sees_the_trained_head(
    trainer: pl.Trainer, model: HeadBuiltInConfigureModel, train_loader: DataLoader, val_loader: DataLoader
) -> None:
    """Fit ``model``, then validate it with the same Trainer: the workers, which build its head afresh in
    ``configure_model``, must evaluate the head the fit trained (the fit's last ``val_loss``), which the driver's
    model has no place for (a :class:`~raylane.WeightsNotOnDriverWarning` names it)."""
    with pytest.warns(WeightsNotOnDriverWarning, match=r"head\.weight, head\.bias"):
        trainer.fit(model, train_loader, val_loader)
    after_fit = float(trainer.callback_metrics["val_loss"])  # the last epoch's, on the final weights
    [validated] = trainer.validate(model, val_loader)
    assert validated["val_loss"] == pytest.approx(after_fit, abs=1e-5), (
        f"validate() after fit() gave val_loss {validated['val_loss']}, the fit ended at {after_fit}: did the "
        "workers evaluate a fresh head?"
    )


def assert_separate_optimizers_need_then_train_with(
    backend: str, root: Path, remedy: str, refusing: Mapping[str, Any], accepting: Mapping[str, Any]
) -> None:
    """Two optimizers stepped by hand on separate layers (a GAN's loop) leave each backward pass's other layer without
    a gradient: ``backend`` with the options ``refusing`` must fail saying ``remedy``, the strategy to build instead,
    and with ``accepting`` (built that way) train to one process's weights. 2 workers, 2 epochs."""

    def trainer(options: Mapping[str, Any]) -> pl.Trainer:
        strategy = get_strategy(backend, workers=2, idle_timeout=0, **options)  # the next fit needs the CPUs
        return pl.Trainer(strategy=strategy, max_epochs=2, enable_checkpointing=False, default_root_dir=root, **QUIET)

    dataset = make_dataset(samples=64)
    with pytest.raises(WorkerError) as refused:
        fit_distributed(trainer(refusing), TwoOptimizerClassifier(), dataset, global_batch=16)
    assert f"build the strategy as {remedy}" in str(refused.value), str(refused.value)
    torch.manual_seed(5)
    model = TwoOptimizerClassifier()
    reference = TwoOptimizerClassifier()
    reference.load_state_dict(model.state_dict())
    actual = fit_distributed(trainer(accepting), model, dataset, global_batch=16)
    expected = fit_one_process(reference, dataset, global_batch=16, max_epochs=2)
    assert_same_weights(actual, expected, atol=1e-6, what=f"two optimizers with {remedy}")
