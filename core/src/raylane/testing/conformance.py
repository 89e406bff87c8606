"""The conformance suite every raylane backend passes. Subclass it in the backend's tests::

    from raylane.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mine"

Everything runs for real: a local Ray, real Lightning, real worker processes, real failures.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytorch_lightning as pl
import ray
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from ray.util.placement_group import placement_group, remove_placement_group
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from raylane import (
    ConfigurationError,
    ResourceError,
    SerializationError,
    WorkerError,
    get_strategy,
    release_idle_workers,
    trained_state_dict,
)
from raylane.testing.equivalence import (
    VALIDATION_SAMPLES,
    assert_same_weights,
    assert_validate_after_fit_sees_the_trained_head,
    fit_distributed,
    fit_one_process,
    validation_loader,
    weights_of,
)
from raylane.testing.faults import KilledOnce, signal_worker
from raylane.testing.models import (
    ClassifierModel,
    HeadBuiltInConfigureModel,
    ManuallyOptimizedClassifier,
    make_dataset,
    make_loader,
)
from raylane.testing.processes import env_without_ray_address
from raylane.testing.ray_data import RowRecordingModel, make_ray_dataset, rows_seen
from raylane.testing.ray_state import assert_released, ensure_local_ray, release_dropped_trainers_workers


class UnpicklableModel(ClassifierModel):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


class ConformanceBase:
    """Fixtures and helpers of the suites below. Set ``backend``; override ``backend_options`` for options the
    backend needs."""

    backend: ClassVar[str]
    backend_options: ClassVar[dict[str, Any]] = {}
    workers: ClassVar[int] = 2
    # Float tolerance for "same weights as one process": allreduce sums in a different order.
    weight_tolerance: ClassVar[float] = 1e-6
    # The same with Trainer(precision="bf16-mixed"): bf16 keeps 8 bits of mantissa.
    bf16_weight_tolerance: ClassVar[float] = 5e-3

    @pytest.fixture(autouse=True)
    def _ray(self) -> None:
        # A test's dropped Trainer leaves its idle workers to the next test's Trainer of the same shape, as a script's
        # leaves them to its next one: most tests run on warm workers, as users' later Trainers do.
        ensure_local_ray()

    @pytest.fixture
    def nothing_idle(self) -> None:
        """For a test that checks, at its end, that its run released everything, or that needs fresh workers: no
        idle worker of an earlier test's is left when it starts."""
        release_dropped_trainers_workers()

    @pytest.fixture(autouse=True, scope="class")
    def _nothing_idle_after_the_class(self) -> Iterator[None]:
        yield  # the tests after this class's (the backend's own) start with every CPU free
        release_dropped_trainers_workers()

    def strategy(self, **options: Any) -> pl.strategies.Strategy:
        return get_strategy(self.backend, **{"workers": self.workers, **self.backend_options, **options})

    def checkpoint_weights(self, path: Path) -> dict[str, torch.Tensor]:
        """The model weights in a checkpoint the backend's workers wrote. A backend whose checkpoints are not one
        ``torch.save`` file (a sharded checkpoint directory) overrides this to read its own format."""
        assert path.is_file(), f"{path} is not a checkpoint file"
        return torch.load(path, weights_only=False)["state_dict"]  # type: ignore[no-any-return]

    def trainer(self, root: Path, strategy: pl.strategies.Strategy | None = None, **flags: Any) -> pl.Trainer:
        defaults: dict[str, Any] = {
            "max_epochs": 2,
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
        }
        return pl.Trainer(strategy=strategy or self.strategy(), **{**defaults, **flags})


# A user's script for the unified package's namespace (the rest of the suite uses pytorch_lightning): it imports only
# lightning.pytorch, fits with a validation loader, and prints what came back. argv: backend, workers, options (JSON).
OTHER_NAMESPACE_SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from raylane import get_strategy


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def on_train_start(self):
        from raylane.torch_distributed import group_in_use_is_the_backends

        self.log("group_from_backend", float(group_in_use_is_the_backends()), sync_dist=True, reduce_fx="min")
        self.log("worker_pid", float(os.getpid()))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


torch.manual_seed(0)
features = torch.randn(64, 4)
data = TensorDataset(features, features.sum(dim=1, keepdim=True))
model = Regressor()
before = model.layer.weight.detach().clone()
strategy = get_strategy(sys.argv[1], workers=int(sys.argv[2]), **json.loads(sys.argv[3]))
trainer = pl.Trainer(max_epochs=1, strategy=strategy, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
print("REPORT " + json.dumps({
    "strategy_class": type(strategy).__qualname__,
    "weights_moved": float((model.layer.weight.detach() - before).abs().sum()),
    "trained_elsewhere": int(trainer.callback_metrics["worker_pid"]) != os.getpid(),
    "group_from_backend": float(trainer.callback_metrics["group_from_backend"]),
    "has_val_loss": "val_loss" in trainer.callback_metrics,
    "namespaces": [name for name in ("pytorch_lightning", "lightning.pytorch") if name in sys.modules],
}))
"""


class ResultsConformance(ConformanceBase):
    """What a backend brings back to the driver, how it ranks its workers, and which bad input it rejects."""

    def test_one_fit_in_the_lightning_pytorch_namespace(self, tmp_path: Path) -> None:
        """The rest of the suite runs in ``pytorch_lightning``; one representative fit (a fresh process that imports
        only ``lightning.pytorch``, as users of the unified package do) covers the other namespace."""
        env = {**env_without_ray_address(), "PYTHONPATH": os.pathsep.join(sys.path)}
        options = json.dumps(self.backend_options)
        command = [sys.executable, "-c", OTHER_NAMESPACE_SCRIPT, self.backend, str(self.workers), options]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        reports = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
        assert done.returncode == 0 and reports, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        report = json.loads(reports[-1].removeprefix("REPORT "))
        assert report["namespaces"] == ["lightning.pytorch"], "raylane imported the other Lightning"
        assert report["strategy_class"].endswith(".for_lightning_pytorch"), report
        assert report["trained_elsewhere"] and report["weights_moved"] > 0 and report["has_val_loss"], report
        assert report["group_from_backend"] == 1.0, "training used a process group the backend's hook did not make"

    # -- results come back to the driver ---------------------------------------------------------------------------

    def test_fit_brings_back_weights_progress_and_checkpoint_and_a_test_from_it_its_weights(
        self, tmp_path: Path
    ) -> None:
        model = ClassifierModel()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = self.trainer(tmp_path)
        trainer.fit(model, make_loader(8), make_loader(8))

        assert trainer.state.finished and trainer.state.fn == "fit"
        assert trainer.current_epoch == 2
        assert trainer.global_step == 2 * 64 // (8 * self.workers)
        assert {"train_loss", "val_loss"} <= set(trainer.callback_metrics)
        assert not torch.equal(initial["layer.weight"], model.layer.weight)
        best = Path(trainer.checkpoint_callback.best_model_path)
        assert best.exists(), "the checkpoint rank 0 wrote must be readable on the driver"
        saved = self.checkpoint_weights(best)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(saved[name], value)
        assert saved["layer.weight"].shape == initial["layer.weight"].shape
        # test(ckpt_path=...) loads the checkpoint into the model: one process's model then holds its weights.
        model.load_state_dict(initial)
        trainer.test(model, make_loader(8), ckpt_path=str(best))
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, saved[name], msg=lambda m, n=name: f"after test(ckpt_path=...): {n}: {m}")

    def test_validate_and_test_return_rank_zero_metrics(self, tmp_path: Path) -> None:
        model = ClassifierModel()
        trainer = self.trainer(tmp_path)
        [validated] = trainer.validate(model, make_loader(8))
        assert validated["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
        [tested] = trainer.test(model, make_loader(8))
        assert tested["test_loss"] == pytest.approx(float(trainer.callback_metrics["test_loss"]))
        assert trainer.state.fn == "test" and trainer.state.finished

    def test_test_and_predict_after_fit_use_the_weights_the_driver_holds_now(self, tmp_path: Path) -> None:
        # fit, then change the weights on the driver (as loading another checkpoint does), then test and predict on
        # the same warm workers: their metrics and outputs are the driver's model's, not what the workers last held.
        model = ClassifierModel(optimizer="adam")
        trainer = self.trainer(tmp_path, enable_checkpointing=False)
        trainer.fit(model, make_loader(8), validation_loader())
        with torch.no_grad():
            model.layer.weight.mul_(0.5)
        inputs, targets = make_dataset(samples=64, seed=3).tensors
        with torch.no_grad():
            expected = model(inputs)
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=8)
        [tested] = trainer.test(model, loader)
        expected_loss = nn.functional.cross_entropy(expected, targets).item()
        assert tested["test_loss"] == pytest.approx(expected_loss, abs=1e-5), (
            f"test() after fit() reported test_loss {tested['test_loss']}; the driver's model gives {expected_loss}"
        )
        predicted = torch.cat(trainer.predict(model, loader))
        torch.testing.assert_close(predicted, expected, msg=lambda m: f"predict() after fit() and test(): {m}")

    def test_layers_only_configure_model_builds_keep_their_trained_weights_for_the_next_entry_point(
        self, tmp_path: Path
    ) -> None:
        # The driver's model cannot hold them; in one process the next validate() would evaluate the trained layers
        # (configure_model skips those that exist), and so must the workers, which build them afresh.
        model = HeadBuiltInConfigureModel(optimizer="adam")
        trainer = self.trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
        assert_validate_after_fit_sees_the_trained_head(trainer, model, make_loader(8), validation_loader())
        # What the workers evaluated is what raylane.trained_state_dict(model) gives the user, head included.
        here = HeadBuiltInConfigureModel()
        here.configure_model()
        here.load_state_dict(trained_state_dict(model))  # strict: every trained weight
        inputs, targets = next(iter(DataLoader(validation_loader().dataset, batch_size=VALIDATION_SAMPLES)))
        with torch.no_grad():
            expected = nn.functional.cross_entropy(here(inputs), targets).item()
        assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(expected, abs=1e-5)

    def test_predict_returns_every_rank_in_dataset_order(self, tmp_path: Path) -> None:
        model = ClassifierModel()
        dataset = make_dataset(samples=61)  # uneven: the ranks get different numbers of samples
        predictions = self.trainer(tmp_path).predict(model, DataLoader(dataset, batch_size=8))
        with torch.no_grad():
            expected = [model(inputs) for inputs, _ in DataLoader(dataset, batch_size=8)]
        assert [p.shape for p in predictions] == [e.shape for e in expected]
        torch.testing.assert_close(torch.cat(predictions), torch.cat(expected))

    def test_ray_data_fit_and_validation_see_every_row_once(self, tmp_path: Path) -> None:
        # Predict is not here: its shards may differ in batch count, which a backend whose forward is a collective
        # cannot run (deepspeed's ZeRO-3); tests/test_ray_data.py covers predict on ddp, and fsdp's tests its own
        # streamed predict (it gathers the whole model first).
        from raylane.data import from_ray

        model = RowRecordingModel(report_dir=str(tmp_path))
        trainer = self.trainer(tmp_path, max_epochs=1)
        trainer.fit(model, from_ray(make_ray_dataset(64), batch_size=8), from_ray(make_ray_dataset(32), batch_size=8))
        reports = rows_seen(tmp_path)
        for key, rows in (("fit-epoch0", 64), ("val-run0", 32)):
            seen = [row for report in reports for row in report[key]]
            assert sorted(seen) == list(range(rows)), f"{key}: every row exactly once across the ranks"

    # -- ranks, sampler, initial weights ---------------------------------------------------------------------------

    def test_ranks_sampler_and_initial_weights(self, tmp_path: Path) -> None:
        model = ClassifierModel(report_dir=str(tmp_path))
        self.trainer(tmp_path, max_epochs=1).fit(model, make_loader(8))
        reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("fit-rank*.json"))]
        assert sorted(r["global_rank"] for r in reports) == list(range(self.workers))
        for report in reports:
            assert report["world_size"] == self.workers
            assert report["env_rank"] == str(report["global_rank"])
            assert report["sampler_replicas"] == self.workers
            assert report["sampler_rank"] == report["global_rank"]
        assert len({r["pid"] for r in reports}) == self.workers, "each rank is its own process"
        assert len({r["initial_weight_fingerprint"] for r in reports}) == 1, "every rank starts from the same weights"
        # Lightning makes a process group of its own when none exists, which would hide a setup hook that does nothing.
        assert all(r["process_group_from_backend"] for r in reports), (
            "training used a process group other than the one raylane_setup_process_group made (does the hook "
            "initialise torch.distributed?)"
        )

    def _fit_here_and_in_one_process(
        self,
        tmp_path: Path,
        optimizer: str,
        global_batch: int,
        report_dir: str | None = None,
        model_class: type[ClassifierModel] = ClassifierModel,
        **flags: Any,
    ) -> tuple[pl.Trainer, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The same initial weights fitted on this backend and in one process with the union batch, as users train:
        a validation loader and Lightning's default sanity check (see testing.equivalence). Returns the backend's
        Trainer and both sets of final weights."""
        distributed = model_class(optimizer=optimizer, report_dir=report_dir)
        single = model_class(optimizer=optimizer)
        single.load_state_dict(distributed.state_dict())
        dataset = make_dataset(samples=128)
        trainer = self.trainer(tmp_path, enable_checkpointing=False, **flags)
        actual = fit_distributed(trainer, distributed, dataset, global_batch=global_batch)
        return trainer, actual, fit_one_process(single, dataset, global_batch=global_batch, **flags)

    def test_same_weights_as_one_process_with_the_union_batch(self, tmp_path: Path) -> None:
        for optimizer in ("sgd", "adam", "adamw"):
            torch.manual_seed(7)
            _, actual, expected = self._fit_here_and_in_one_process(
                tmp_path, optimizer, 16 * self.workers, max_epochs=2
            )
            assert_same_weights(actual, expected, atol=self.weight_tolerance, what=f"{self.backend}, {optimizer}")

    def test_accumulated_gradients_give_the_weights_of_one_process(self, tmp_path: Path) -> None:
        # One process steps every 3 batches and after the epoch's last batch (8 batches: 3, 3, 2), the gradient of
        # each batch's loss divided by 3. An engine that divides again (DeepSpeed's backward does) shrinks every step;
        # one that counts batches across epochs steps elsewhere. SGD, because Adam's step hardly depends on the
        # gradient's scale and would hide the first.
        torch.manual_seed(13)
        trainer, actual, expected = self._fit_here_and_in_one_process(
            tmp_path, "sgd", 8 * self.workers, max_epochs=2, accumulate_grad_batches=3
        )
        batches_per_epoch = 128 // (8 * self.workers)
        assert trainer.global_step == 2 * math.ceil(batches_per_epoch / 3), "a step every 3 batches and at epoch end"
        assert_same_weights(actual, expected, atol=self.weight_tolerance, what=f"{self.backend}, accumulated")

    def test_manual_optimization_gives_the_weights_of_one_process(self, tmp_path: Path) -> None:
        # training_step runs its own backward and optimizer step, calling its layer directly (a GAN's steps do). The
        # fsdp backend once registered such a step as its root unit's forward, and FSDP2 reduces no gradient of a
        # backward inside a forward: every weight stayed where it started, and fit() reported success.
        torch.manual_seed(19)
        _, actual, expected = self._fit_here_and_in_one_process(
            tmp_path, "adam", 16 * self.workers, model_class=ManuallyOptimizedClassifier, max_epochs=2
        )
        assert_same_weights(actual, expected, atol=self.weight_tolerance, what=f"{self.backend}, manual optimization")

    def test_bf16_mixed_precision_reaches_the_workers_and_trains_as_one_process(self, tmp_path: Path) -> None:
        # Trainer(precision=...) is set on the driver; every rank must compute in it, and its gradients must still be
        # reduced, accumulated and scaled as in one process. SGD over accumulated batches, which shows a gradient of
        # the wrong size (Adam would hide it). bf16 rounds differently with the batch split across ranks, so the
        # weights agree to bf16's precision only: about 2e-3 apart on the built-in backends, where a gradient
        # divided twice by the accumulation put them 3e-2 apart.
        torch.manual_seed(17)
        trainer, actual, expected = self._fit_here_and_in_one_process(
            tmp_path,
            "sgd",
            8 * self.workers,
            report_dir=str(tmp_path),
            max_epochs=1,
            accumulate_grad_batches=3,
            precision="bf16-mixed",
        )
        reports = sorted(tmp_path.glob("train-step-rank*.json"))
        assert len(reports) == self.workers, f"every rank trains: {reports}"
        assert {json.loads(path.read_text())["logits_dtype"] for path in reports} == {"torch.bfloat16"}
        assert trainer.global_step == math.ceil(128 // (8 * self.workers) / 3)
        assert_same_weights(actual, expected, atol=self.bf16_weight_tolerance, what=f"{self.backend}, bf16-mixed")

    @pytest.mark.usefixtures("nothing_idle")
    def test_entry_points_reuse_warm_workers_until_released(self, tmp_path: Path) -> None:
        model = ClassifierModel(report_dir=str(tmp_path))
        trainer = self.trainer(tmp_path, max_epochs=1)  # warm by default
        trainer.fit(model, make_loader(8))
        trainer.test(model, make_loader(8))
        assert _pids(tmp_path, "fit") == _pids(tmp_path, "test"), "test() after fit() runs on the same warm actors"
        trainer.strategy.release_workers()  # type: ignore[attr-defined]
        assert_released()

    @pytest.mark.usefixtures("nothing_idle")
    def test_a_later_trainer_trains_on_the_idle_workers_to_the_weights_fresh_ones_give(self, tmp_path: Path) -> None:
        # A re-run notebook cell: a new Trainer of the same shape takes the last one's idle workers, and must train as
        # fresh workers would, whatever the backend left in them. Dropout draws from each worker's random generator,
        # which the driver's state must reset (the driver is seeded the same before both fits).
        torch.manual_seed(11)
        initial = ClassifierModel(dropout=0.5).state_dict()
        pids, weights = [], []
        for run in ("fresh", "reused"):
            model = ClassifierModel(dropout=0.5, report_dir=str(tmp_path / run))
            model.load_state_dict(initial)
            (tmp_path / run).mkdir()
            torch.manual_seed(5)
            trainer = self.trainer(tmp_path / run, enable_checkpointing=False)
            trainer.fit(model, make_loader(8), validation_loader())
            pids.append(_pids(tmp_path / run, "fit"))
            weights.append(weights_of(model))
        assert pids[1] == pids[0], "the later Trainer trained on the earlier one's idle workers"
        assert_same_weights(weights[1], weights[0], atol=self.weight_tolerance, what=f"{self.backend}, reused workers")

    @pytest.mark.usefixtures("nothing_idle")
    def test_idle_workers_are_released_after_idle_timeout(self, tmp_path: Path) -> None:
        trainer = self.trainer(tmp_path, strategy=self.strategy(idle_timeout=1))
        trainer.validate(ClassifierModel(), make_loader(8))
        assert_released(timeout_s=20)

    @pytest.mark.usefixtures("nothing_idle")
    def test_idle_workers_make_way_for_work_that_waits_for_their_cpus(self, tmp_path: Path) -> None:
        trainer = self.trainer(tmp_path, strategy=self.strategy(idle_timeout=600))
        trainer.validate(ClassifierModel(), make_loader(8))
        everything = ray.remote(num_cpus=ray.cluster_resources()["CPU"])(lambda: "ran")
        assert ray.get(everything.remote(), timeout=60) == "ran", "the idle workers gave their CPUs back"
        assert_released()

    # -- bad input fails before any actor starts -------------------------------------------------------------------

    @pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True])
    def test_invalid_workers_rejected(self, workers: object) -> None:
        with pytest.raises(ConfigurationError, match="workers"):
            get_strategy(self.backend, workers=workers)

    def test_unknown_option_lists_valid_ones(self) -> None:
        with pytest.raises(ConfigurationError, match="cpus_per_worker") as info:
            get_strategy(self.backend, workers=2, cpu_per_worker=1)
        assert "cpu_per_worker" in str(info.value)

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"cpus_per_worker": -1}, "cpus_per_worker"),
            ({"resources_per_worker": {"custom": -2}}, "custom"),
            ({"gpus_per_worker": 0.5}, "use_gpu"),
            ({"placement_strategy": "PACKED"}, "PACK, SPREAD"),
        ],
    )
    def test_invalid_resources_rejected(self, options: dict[str, Any], message: str) -> None:
        with pytest.raises(ConfigurationError, match=message):
            self.strategy(**options)

    @pytest.mark.usefixtures("nothing_idle")
    def test_more_than_the_cluster_holds_fails_fast(self, tmp_path: Path) -> None:
        trainer = self.trainer(tmp_path, strategy=self.strategy(cpus_per_worker=10_000))
        started = time.monotonic()
        with pytest.raises(ResourceError, match="Asked for"):
            trainer.fit(ClassifierModel(), make_loader(8))
        assert time.monotonic() - started < 20
        assert_released()

    def test_gpu_on_a_cluster_without_gpus_shows_resources(self, tmp_path: Path) -> None:
        if ray.cluster_resources().get("GPU"):
            pytest.skip("this cluster has GPUs")
        trainer = self.trainer(tmp_path, strategy=self.strategy(use_gpu=True))
        with pytest.raises(ResourceError, match="no GPU"):
            trainer.fit(ClassifierModel(), make_loader(8))

    def test_trainer_devices_contradicting_workers_rejected(self, tmp_path: Path) -> None:
        trainer = self.trainer(tmp_path, accelerator="cpu", devices=self.workers + 1)
        with pytest.raises(ConfigurationError, match="devices"):
            trainer.fit(ClassifierModel(), make_loader(8))

    @pytest.mark.usefixtures("nothing_idle")
    def test_trainer_num_nodes_rejected(self, tmp_path: Path) -> None:
        # Ray places the workers on nodes; a node count of the Trainer's own would contradict it.
        with pytest.raises(ConfigurationError, match=r"num_nodes=2.*Remove num_nodes"):
            self.trainer(tmp_path, num_nodes=2).fit(ClassifierModel(), make_loader(8))
        assert_released()

    @pytest.mark.usefixtures("nothing_idle")
    def test_unpicklable_model_names_the_attribute(self, tmp_path: Path) -> None:
        with pytest.raises(SerializationError, match=r"model\.lock"):
            self.trainer(tmp_path).fit(UnpicklableModel(), make_loader(8))
        assert_released()

    def test_lightning_strategy_name_resolves(self) -> None:
        trainer = pl.Trainer(strategy=f"ray_{self.backend}", logger=False, enable_progress_bar=False)
        assert type(trainer.strategy) is type(self.strategy())
        assert trainer.strategy.launch_options.workers == 2  # type: ignore[attr-defined]


class FailureConformance(ConformanceBase):
    """Failures never hang and leave nothing behind; a failed fit restarts from its checkpoint."""

    # -- failures never hang and leave nothing behind --------------------------------------------------------------

    @pytest.mark.usefixtures("nothing_idle")
    def test_worker_exception_reaches_driver_with_rank(self, tmp_path: Path) -> None:
        failing_rank = self.workers - 1
        model = ClassifierModel(fail_on_rank=failing_rank, fail_at_step=1)
        with pytest.raises(WorkerError, match="injected failure") as info:
            self.trainer(tmp_path).fit(model, make_loader(8))
        assert info.value.rank == failing_rank
        assert f"rank {failing_rank}" in str(info.value)
        assert_released()

    @pytest.mark.usefixtures("nothing_idle")
    def test_killed_worker_reaches_driver_quickly(self, tmp_path: Path) -> None:
        model = ClassifierModel(fail_on_rank=self.workers - 1, fail_at_step=1, fail_mode="kill")
        started = time.monotonic()
        with pytest.raises(WorkerError, match="died") as info:
            self.trainer(tmp_path).fit(model, make_loader(8))
        assert time.monotonic() - started < 60
        assert info.value.rank == self.workers - 1
        assert_released()

    @pytest.mark.usefixtures("nothing_idle")
    def test_worker_killed_from_outside_reaches_driver(self, tmp_path: Path) -> None:
        # Rank 0 stalls, so the victim is a healthy rank blocked in a collective when the signal lands; the kill waits
        # for rank 0's marker (written as it stalls, in training), never landing during the workers' start-up.
        stalled = tmp_path / "rank0-stalled"
        model = ClassifierModel(fail_on_rank=0, fail_at_step=1, fail_mode="hang", fail_once_marker=str(stalled))
        victim = self.workers - 1
        killer = threading.Thread(
            target=signal_worker, args=(victim, signal.SIGKILL), kwargs={"after": stalled}, daemon=True
        )
        killer.start()
        with pytest.raises(WorkerError, match="died") as info:
            self.trainer(tmp_path).fit(model, make_loader(8))
        assert info.value.rank == victim
        killer.join(timeout=10)
        assert_released()

    @pytest.mark.usefixtures("nothing_idle")
    def test_frozen_worker_fails_after_heartbeat_timeout(self, tmp_path: Path) -> None:
        model = ClassifierModel(fail_on_rank=self.workers - 1, fail_at_step=1, fail_mode="freeze")
        started = time.monotonic()
        with pytest.raises(WorkerError, match="stopped answering") as info:
            self.trainer(tmp_path, strategy=self.strategy(heartbeat_timeout=3)).fit(model, make_loader(8))
        assert time.monotonic() - started < 90
        assert info.value.rank == self.workers - 1
        assert_released()

    @pytest.mark.usefixtures("nothing_idle")
    def test_a_rank_that_never_joins_a_collective_is_named_within_collective_timeout(self, tmp_path: Path) -> None:
        model = ClassifierModel(fail_on_rank=self.workers - 1, fail_at_step=1, fail_mode="hang")
        started = time.monotonic()
        with pytest.raises(WorkerError) as failure:
            self.trainer(tmp_path, strategy=self.strategy(collective_timeout=5)).fit(model, make_loader(8))
        assert time.monotonic() - started < 90
        # The error blames the rank that never joined, not the ones that waited for it, and shows where it was.
        assert failure.value.rank == self.workers - 1, str(failure.value)
        assert "never joined a collective" in str(failure.value)
        assert "in training_step" in str(failure.value), str(failure.value)
        assert_released()

    @pytest.mark.usefixtures("nothing_idle")
    def test_busy_resources_wait_then_fail_with_detail(self, tmp_path: Path) -> None:
        cpus = ray.cluster_resources()["CPU"]
        blocker = placement_group([{"CPU": cpus}])
        ray.get(blocker.ready(), timeout=30)
        try:
            started = time.monotonic()
            with pytest.raises(ResourceError, match="resource_timeout"):
                self.trainer(tmp_path, strategy=self.strategy(resource_timeout=3)).fit(
                    ClassifierModel(), make_loader(8)
                )
            assert 3 <= time.monotonic() - started < 30
        finally:
            remove_placement_group(blocker)
        assert_released()

    @pytest.mark.usefixtures("nothing_idle")
    def test_restart_from_last_checkpoint_matches_uninterrupted_run(self, tmp_path: Path) -> None:
        steps_per_epoch = 64 // (8 * self.workers)
        torch.manual_seed(3)
        # The first step of the third epoch, right after a checkpoint.
        killed = KilledOnce(rank=self.workers - 1, at_step=2 * steps_per_epoch, folder=tmp_path)
        interrupted = ClassifierModel(**killed.model_options())
        uninterrupted = ClassifierModel()
        uninterrupted.load_state_dict(interrupted.state_dict())
        every_epoch = {"callbacks": [ModelCheckpoint(save_top_k=-1, every_n_epochs=1)], "max_epochs": 4}
        trainer = self.trainer(tmp_path / "a", strategy=self.strategy(max_failures=1), **every_epoch)
        trainer.fit(interrupted, make_loader(8), validation_loader())
        every_epoch["callbacks"] = [ModelCheckpoint(save_top_k=-1, every_n_epochs=1)]
        self.trainer(tmp_path / "b", **every_epoch).fit(uninterrupted, make_loader(8), validation_loader())
        assert killed.happened, "the failure was injected"
        assert trainer.current_epoch == 4
        assert_same_weights(
            interrupted.state_dict(), uninterrupted.state_dict(), atol=self.weight_tolerance, what="restarted fit"
        )
        release_idle_workers()  # both Trainers' (the second is dropped already): nothing else may be left
        assert_released()


def _pids(report_dir: Path, stage: str) -> list[int]:
    """The worker processes that ran ``stage`` (ClassifierModel's per-rank reports), sorted."""
    return sorted(json.loads(path.read_text())["pid"] for path in report_dir.glob(f"{stage}-rank*.json"))


class BackendConformance(ResultsConformance, FailureConformance):
    """What every backend must do: subclass it in a ``Test...`` class and set ``backend``.

    A second configuration of one backend (another engine, say) may subclass :class:`ResultsConformance` alone: the
    failure handling it would repeat is the core's, which the backend's first configuration proves."""
