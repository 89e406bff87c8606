"""Small deterministic models and data for backend tests. Importable on workers (they live in an installed package)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset


def make_dataset(samples: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """A fixed random classification problem."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    targets = torch.randint(0, classes, (samples,), generator=generator)
    return TensorDataset(inputs, targets)


def make_loader(batch_size: int = 8, samples: int = 64, **kwargs: Any) -> DataLoader:
    return DataLoader(make_dataset(samples), batch_size=batch_size, **kwargs)


class ClassifierModel(pl.LightningModule):
    """A linear classifier that logs what the conformance suite checks.

    ``optimizer``: ``"sgd"``, ``"adam"`` or ``"adamw"`` (weight decay 0.1: the optimizer most users train with, whose
    ``defaults`` hold an entry its constructor does not take).
    ``report_dir``: every rank writes what it saw (ranks, sampler, initial weights, node, the ``report_env``
    variables; the dtype its first training batch computed in) there as JSON.
    ``dropout``: the probability of zeroing an input in training; above 0, each step draws from the worker's torch
    random number generator, so a run's weights depend on that generator's state.
    ``fail_on_rank`` / ``fail_at_step`` / ``fail_mode``: make one rank raise, kill its own process (``"kill"``),
    hang without dying (``"hang"``: it still answers Ray) or freeze its whole process with SIGSTOP (``"freeze"``: it
    answers nothing, like a wedged host). With ``fail_once_marker`` (a file path) it fails only the first time.
    """

    def __init__(
        self,
        features: int = 8,
        classes: int = 3,
        lr: float = 0.1,
        optimizer: str = "sgd",
        report_dir: str | None = None,
        report_env: tuple[str, ...] = (),
        fail_on_rank: int | None = None,
        fail_at_step: int = 0,
        fail_mode: str = "raise",
        fail_once_marker: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.layer = nn.Linear(features, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layer(self.dropout(inputs))

    def _inputs_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        return inputs, targets

    def _loss(self, batch: Any) -> torch.Tensor:
        inputs, targets = self._inputs_and_targets(batch)
        return nn.functional.cross_entropy(self(inputs), targets)

    def on_train_start(self) -> None:
        if self.hparams.report_dir is not None:
            sampler = getattr(self.trainer.train_dataloader, "sampler", None)
            self._report(
                "fit",
                {
                    "global_rank": self.global_rank,
                    "local_rank": self.local_rank,
                    "node_rank": self.trainer.node_rank,
                    "world_size": self.trainer.world_size,
                    "env_rank": os.environ.get("RANK"),
                    "sampler_replicas": getattr(sampler, "num_replicas", None),
                    "sampler_rank": getattr(sampler, "rank", None),
                    "initial_weight_fingerprint": weight_fingerprint(_whole(self.layer.weight)),
                    "device": str(self.device),
                    "pid": os.getpid(),
                    "node_id": _ray_node_id(),
                    "process_group_from_backend": _process_group_from_backend(),
                    "env": {name: os.environ.get(name) for name in self.hparams.report_env},
                },
            )

    def on_test_start(self) -> None:
        if self.hparams.report_dir is not None:
            self._report("test", {"global_rank": self.global_rank, "pid": os.getpid()})

    def _report(self, stage: str, data: dict[str, Any]) -> None:
        assert self.hparams.report_dir is not None
        path = Path(self.hparams.report_dir) / f"{stage}-rank{self.global_rank}.json"
        path.write_text(json.dumps(data))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_rank == self.hparams.fail_on_rank and self.global_step >= self.hparams.fail_at_step:
            self._inject_failure()
        inputs, targets = self._inputs_and_targets(batch)
        logits = self(inputs)
        if self.hparams.report_dir is not None and batch_idx == 0:
            self._report("train-step", {"logits_dtype": str(logits.dtype)})  # the Trainer's precision at work
        loss = nn.functional.cross_entropy(logits, targets)
        self.log("train_loss", loss)
        return loss

    def _inject_failure(self) -> None:
        marker = self.hparams.fail_once_marker
        if marker is not None:
            if os.path.exists(marker):
                return
            Path(marker).touch()
        if self.hparams.fail_mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hparams.fail_mode == "hang":
            time.sleep(3600)  # alive but never joins the next collective
        if self.hparams.fail_mode == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)  # every thread stops, the heartbeat's too
        raise RuntimeError(f"injected failure on rank {self.global_rank}")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class HeadBuiltInConfigureModel(ClassifierModel):
    """:class:`ClassifierModel` with a second layer that only ``configure_model`` creates, as Lightning advises for
    models too big for one process: only the workers run that hook, so the driver's model never holds the layer. The
    hook skips a head that exists, as Lightning asks of it (it runs at every entry point)."""

    def configure_model(self) -> None:
        if not hasattr(self, "head"):
            self.head = nn.Linear(self.hparams.classes, self.hparams.classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(inputs))  # type: ignore[no-any-return]


class ManuallyOptimizedClassifier(ClassifierModel):
    """:class:`ClassifierModel` stepped by hand (``automatic_optimization = False``, Lightning's way for GANs and
    other custom loops), its ``training_step`` calling the layer directly rather than through ``self(...)``, as such
    steps usually do (``self.generator(z)``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        loss = nn.functional.cross_entropy(self.layer(self.dropout(inputs)), targets)
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        self.log("train_loss", loss)
        return loss


class TwoOptimizerClassifier(ClassifierModel):
    """Two heads, each with its own optimizer and LR schedule, stepped by hand (Lightning's multi-optimizer way, a
    GAN's loop): ``training_step`` calls each head directly."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.other = nn.Linear(8, 3)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        sgd, adam = self.optimizers()  # type: ignore[misc]
        for optimizer, head in ((sgd, self.layer), (adam, self.other)):
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(head(inputs), targets))
            optimizer.step()

    def on_train_epoch_end(self) -> None:
        for scheduler in self.lr_schedulers():  # type: ignore[union-attr]
            scheduler.step()

    def configure_optimizers(self) -> Any:
        sgd = torch.optim.SGD(self.layer.parameters(), lr=0.1, momentum=0.9)
        adam = torch.optim.Adam(self.other.parameters(), lr=0.01)
        schedules = [
            torch.optim.lr_scheduler.StepLR(sgd, 1, gamma=0.5),
            torch.optim.lr_scheduler.ExponentialLR(adam, 0.7),
        ]
        return [sgd, adam], schedules


def weight_fingerprint(weights: torch.Tensor) -> float:
    """A number that tells two sets of weights apart, where training changes them: their sum of squares. Not their sum:
    the gradient of a softmax layer's weights sums to zero over the classes, so plain SGD keeps that sum as it was."""
    return float((weights.detach().double() ** 2).sum())


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, also where a sharding backend keeps only this rank's shard of it (a DTensor, which every rank
    gathers together)."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def _process_group_from_backend() -> bool:
    from raylane.torch_distributed import group_in_use_is_the_backends

    return group_in_use_is_the_backends()


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class ReferenceSampler(Sampler[int]):
    """The one-process equivalent of Lightning's distributed training sampler.

    Lightning's ``DistributedSampler`` shuffles with ``torch.randperm(n)`` seeded by seed + epoch and deals the
    permutation round-robin to the ranks. Batches of ``world_size * b`` from the same permutation hold exactly the union
    of the ranks' batches of ``b`` at each step (when ``n`` divides evenly), which makes one process a reference.
    Lightning calls ``set_epoch`` on it at every epoch, as on its own samplers.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
