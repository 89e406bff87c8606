"""What the user sees on the driver: one progress bar, rank-prefixed warnings, logs where trainer.logger says."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.tuner import Tuner

from raylane import SerializationError, WeightsNotOnDriverWarning, get_strategy
from raylane.testing import (
    ClassifierModel,
    HeadBuiltInConfigureModel,
    assert_released,
    assert_same_weights,
    ensure_local_ray,
    env_without_ray_address,
    fit_distributed,
    fit_one_process,
    make_dataset,
    make_loader,
    quiet_trainer,
)
from raylane.testing.equivalence import distributed_loader, validation_loader


@pytest.mark.timeout(240)
def test_one_progress_bar_and_rank_prefixed_warnings_on_the_driver(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import warnings
            import pytorch_lightning as pl
            from raylane import get_strategy
            from raylane.testing import ClassifierModel, make_loader

            class Chatty(ClassifierModel):
                def training_step(self, batch, batch_idx):
                    if batch_idx == 0 and self.current_epoch == 0:
                        print(f"hello from rank {self.global_rank}", flush=True)
                        if self.global_rank == 1:
                            warnings.warn("careful on rank 1")
                    return super().training_step(batch, batch_idx)

            if __name__ == "__main__":
                trainer = pl.Trainer(max_epochs=2, strategy=get_strategy("ddp", workers=2), logger=False,
                                     enable_checkpointing=False, enable_model_summary=False)
                trainer.fit(Chatty(), make_loader(8))
            """
        )
    )
    env = env_without_ray_address()
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Epoch 1: 100%" in out, out[-2000:]  # rank 0's Lightning progress bar, drawn on the driver
    assert "hello from rank 0" in out and "(raylane rank 0" not in out  # rank 0's prints arrive unprefixed
    rank1_lines = [line for line in out.splitlines() if "hello from rank 1" in line]
    # Other ranks' prints reach the driver through Ray's log streaming, carrying their rank.
    assert rank1_lines and all("raylane rank 1" in line for line in rank1_lines), out[-3000:]
    everything = out + result.stderr
    warning_lines = [line for line in everything.splitlines() if "careful on rank 1" in line]
    assert warning_lines and all("raylane rank 1" in line for line in warning_lines), warning_lines
    assert everything.count("Epoch 1: 100%") == out.count("Epoch 1: 100%"), "one bar only, on stdout"


@pytest.mark.timeout(120)
def test_logger_writes_where_the_driver_trainer_points(tmp_path: Path) -> None:
    ensure_local_ray()
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=2),
        max_epochs=2,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ClassifierModel(), make_loader(8))
    metrics = Path(trainer.logger.log_dir) / "metrics.csv"
    assert metrics.is_file(), f"rank 0 should have logged into {trainer.logger.log_dir}"
    assert "train_loss" in metrics.read_text().splitlines()[0]
    assert Path(trainer.checkpoint_callback.best_model_path).parent.parent == Path(trainer.logger.log_dir)


@pytest.mark.timeout(120)
def test_start_up_line_names_backend_placement_and_dashboard(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ensure_local_ray()
    # Ray reads this override before anything else when asked for the dashboard's address.
    monkeypatch.setenv("RAY_OVERRIDE_DASHBOARD_URL", "http://dashboard.example:8265")
    caplog.set_level(logging.INFO)
    trainer = quiet_trainer(strategy=get_strategy("ddp", workers=2), max_epochs=1, enable_checkpointing=False)
    trainer.fit(ClassifierModel(), make_loader(8))
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("raylane: ddp")]
    assert len(lines) == 1, lines  # one line per start of the workers
    line = lines[0]
    assert "2 worker(s) on 1 node(s)" in line and "placement PACK" in line, line
    assert "1 CPU and 0 GPU per worker" in line and "devices cpu" in line, line
    assert line.endswith("Ray dashboard http://dashboard.example:8265"), line


@pytest.mark.timeout(240)
def test_ray_started_in_the_background_serves_the_first_fit(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import pytorch_lightning as pl
            import ray
            import raylane
            from raylane.testing import ClassifierModel, make_loader

            raylane.start_ray_in_background(num_cpus=2)
            model, loader = ClassifierModel(), make_loader(8)  # the script's own work, while Ray starts
            before = [p.detach().clone() for p in model.parameters()]
            trainer = pl.Trainer(max_epochs=1, strategy=raylane.get_strategy("ddp", workers=2), logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            trainer.fit(model, loader)
            assert ray.is_initialized()
            assert ray.cluster_resources()["CPU"] == 2, ray.cluster_resources()
            assert any(not p.equal(b) for p, b in zip(model.parameters(), before)), "weights came back trained"
            print("trained")
            """
        )
    )
    env = env_without_ray_address()
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=220
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained" in result.stdout
    assert "SIGTERM handler is not set" not in result.stderr  # the background start is quiet


@pytest.mark.timeout(180)
def test_a_driver_checkpoint_after_fit_says_it_holds_no_optimizer_state(tmp_path: Path) -> None:
    ensure_local_ray()
    model = ClassifierModel(optimizer="adam")
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=2),
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, make_loader(8))
    [written] = Path(trainer.checkpoint_callback.best_model_path).parent.glob("*.ckpt")
    assert torch.load(written, weights_only=False)["optimizer_states"][0]["state"], "the workers' checkpoint has it"

    with pytest.warns(UserWarning, match="no optimizer or LR-scheduler state"):
        trainer.save_checkpoint(tmp_path / "driver.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    assert torch.equal(torch.load(tmp_path / "weights.ckpt")["state_dict"]["layer.weight"], model.layer.weight)


@pytest.mark.timeout(180)
def test_logged_metrics_and_the_best_checkpoint_score_come_back(tmp_path: Path) -> None:
    ensure_local_ray()
    best = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), monitor="val_loss", mode="min")
    trainer = quiet_trainer(strategy=get_strategy("ddp", workers=2, idle_timeout=0), max_epochs=3, callbacks=[best])
    trainer.fit(ClassifierModel(), make_loader(8), make_loader(8))
    assert {"train_loss", "val_loss"} <= set(trainer.logged_metrics), trainer.logged_metrics
    assert trainer.checkpoint_callback is best
    assert best.best_model_score is not None, "the best score the workers' callback found must come back"
    # The best of 3 validations: no worse than the last one, and the score stored in the best checkpoint itself.
    assert float(best.best_model_score) <= float(trainer.callback_metrics["val_loss"]) + 1e-6
    saved = torch.load(best.best_model_path, weights_only=False)["callbacks"]
    [state] = [value for key, value in saved.items() if key.startswith("ModelCheckpoint")]
    assert float(state["best_model_score"]) == pytest.approx(float(best.best_model_score))
    assert set(best.best_k_models) == {best.best_model_path}


@pytest.mark.timeout(180)
def test_an_early_stop_leaves_the_drivers_trainer_as_one_process_leaves_its_own(tmp_path: Path) -> None:
    # A script that asks `if trainer.should_stop:` after fit, or reads where the early stop came, gets one process's
    # answer.
    ensure_local_ray()

    def fit(root: Path, **placement: Any) -> tuple[pl.Trainer, EarlyStopping]:
        stop = EarlyStopping(monitor="val_loss", min_delta=10.0, patience=1)  # no epoch beats the first by 10
        trainer = quiet_trainer(max_epochs=5, callbacks=[stop], default_root_dir=str(root), **placement)
        trainer.fit(ClassifierModel(), make_loader(8), make_loader(8))
        return trainer, stop

    here, stop_here = fit(tmp_path / "ray", strategy=get_strategy("ddp", workers=2, idle_timeout=0))
    one, stop_one = fit(tmp_path / "one", accelerator="cpu", devices=1)
    assert one.should_stop and one.current_epoch < 5, "the early stop this test is about happens"
    assert here.should_stop, "trainer.should_stop on the driver after an early stop"
    assert (here.current_epoch, stop_here.stopped_epoch, stop_here.wait_count) == (
        one.current_epoch,
        stop_one.stopped_epoch,
        stop_one.wait_count,
    )


@pytest.mark.timeout(180)
def test_a_learning_rate_search_answers_on_the_driver_and_sets_the_rate_it_suggests(tmp_path: Path) -> None:
    # Tuner(trainer).lr_find runs its search inside a fit, on the workers. Its answer and the rate it sets on the
    # model used to stay there: lr_find returned None and the model kept its old rate. (Lightning's ddp_spawn
    # crashes.) The search's losses are rank 0's, so its suggestion is not one process's: only how it lands is.
    ensure_local_ray()
    torch.manual_seed(3)
    model = ClassifierModel(optimizer="adam")
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    strategy = get_strategy("ddp", workers=2, idle_timeout=30)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, default_root_dir=str(tmp_path))
    try:
        train = distributed_loader(make_dataset(samples=512), 32, workers=2)
        found = Tuner(trainer).lr_find(model, train, validation_loader(), num_training=20)
        assert found is not None, "Tuner.lr_find's answer reaches the driver"
        assert found.suggestion() is not None and len(found.results["lr"]) == len(found.results["loss"]) > 1
        assert model.hparams.lr == found.suggestion() != 0.1, "the suggested rate is set on the model"
        assert_same_weights(model.state_dict(), initial, atol=0, what="the search leaves the weights as they were")
        trainer.fit(model, train, validation_loader())  # the search leaves the Trainer able to fit
        assert trainer.current_epoch == 1
    finally:
        strategy.release_workers()


@pytest.mark.timeout(180)
def test_a_float64_fit_leaves_the_driver_the_float64_weights_one_process_ends_with(tmp_path: Path) -> None:
    # Lightning converts the model to float64 on the workers; copied into the driver's float32 model, the trained
    # weights were rounded (ddp_spawn rounds them too). One process ends with the float64 model.
    ensure_local_ray()
    distributed = ClassifierModel()
    single = ClassifierModel()
    single.load_state_dict(distributed.state_dict())
    dataset = make_dataset(samples=64)
    flags: dict[str, Any] = {"precision": "64-true", "max_epochs": 2}
    strategy = get_strategy("ddp", workers=2, idle_timeout=0)
    trainer = quiet_trainer(strategy=strategy, enable_checkpointing=False, default_root_dir=str(tmp_path), **flags)
    actual = fit_distributed(trainer, distributed, dataset, global_batch=16)
    expected = fit_one_process(single, dataset, global_batch=16, **flags)
    assert expected["layer.weight"].dtype == torch.float64
    assert_same_weights(actual, expected, atol=1e-12, what="64-true")  # dtypes included


class CompiledOnTheWorkers(ClassifierModel):
    """What the refusal of a compiled model tells users to write."""

    def configure_model(self) -> None:
        self.compile()


class CompilesALayerOnTheWorkers(ClassifierModel):
    """torch.compile(submodule) on the workers: the weights' names gain "_orig_mod." there."""

    def configure_model(self) -> None:
        if not isinstance(self.layer, torch._dynamo.eval_frame.OptimizedModule):
            self.layer = torch.compile(self.layer)  # type: ignore[assignment]


@pytest.mark.timeout(240)
def test_a_compiled_model_is_refused_with_a_way_to_compile_on_the_workers_that_works(tmp_path: Path) -> None:
    ensure_local_ray()
    strategy = get_strategy("ddp", workers=2, idle_timeout=0)
    with pytest.raises(SerializationError, match=r"def configure_model\(self\): self\.compile\(\)"):
        quiet_trainer(strategy=strategy, max_epochs=1, default_root_dir=str(tmp_path)).fit(
            torch.compile(ClassifierModel()), make_loader(8)
        )
    assert_released()
    for model in (CompiledOnTheWorkers(), CompilesALayerOnTheWorkers()):
        initial = model.layer.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error", WeightsNotOnDriverWarning)
            trainer = quiet_trainer(
                strategy=get_strategy("ddp", workers=2), default_root_dir=str(tmp_path), max_epochs=1
            )
            trainer.fit(model, make_loader(8))
        assert not torch.equal(model.layer.weight, initial), f"{type(model).__name__}: trained weights come back"


@pytest.mark.timeout(180)
def test_trained_layers_the_drivers_model_lacks_are_named_and_later_entry_points_go_on_from_them(
    tmp_path: Path,
) -> None:
    # Lightning's spawn launcher drops them silently, and the next entry point then starts from a fresh, untrained
    # head; raylane names them and keeps them with the model for its next entry point, as one process keeps the
    # layers: a fit that cannot move the weights ends where the last fit ended. A checkpoint's head wins over the
    # kept one, and, as in one process, the model holds the checkpoint's weights afterwards.
    ensure_local_ray()
    model = HeadBuiltInConfigureModel()
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{epoch}", monitor="val_loss", save_top_k=-1)
    trainer = quiet_trainer(
        strategy=get_strategy("ddp", workers=2), max_epochs=2, callbacks=[every_epoch], default_root_dir=str(tmp_path)
    )
    with pytest.warns(WeightsNotOnDriverWarning, match=r"\(head\.weight, head\.bias\).*raylane\.trained_state_dict"):
        trainer.fit(model, make_loader(8), make_loader(8))
    after_fit = float(trainer.callback_metrics["val_loss"])

    def fit_without_moving_the_weights() -> float:
        model.hparams.lr = 0.0
        again = quiet_trainer(strategy=get_strategy("ddp", workers=2), max_epochs=1, default_root_dir=str(tmp_path))
        with pytest.warns(WeightsNotOnDriverWarning):
            again.fit(model, make_loader(8), make_loader(8))
        return float(again.callback_metrics["val_loss"])

    assert fit_without_moving_the_weights() == pytest.approx(after_fit), "the second fit starts from the trained head"
    first_epoch = str(tmp_path / "ckpt" / "epoch=0.ckpt")
    with pytest.warns(WeightsNotOnDriverWarning):  # the checkpoint's head, which the driver's model has no place for
        [validated] = trainer.validate(model, make_loader(8), ckpt_path=first_epoch)
    assert validated["val_loss"] == pytest.approx(float(every_epoch.best_k_models[first_epoch])), (
        "validate(ckpt_path=...) evaluates the checkpoint's head, not the one the driver kept"
    )
    assert validated["val_loss"] != pytest.approx(after_fit), "the first epoch's model is not the last one's"
    assert fit_without_moving_the_weights() == pytest.approx(validated["val_loss"]), "the model holds the checkpoint's"


PRELOAD_SCRIPT = """
import sys

import ray
import raylane
from raylane.local_ray import ensure_ray

raylane.start_ray_in_background(num_cpus=2, preload=PRELOAD)
ensure_ray(1)  # what the first fit does: wait for the background start


@ray.remote
def imported_in_a_ray_worker():  # imports nothing itself
    return sorted(name for name in ("torch", "pytorch_lightning", "raylane.worker") if name in sys.modules)


print("IMPORTED", ray.get(imported_in_a_ray_worker.remote()))
job = ray.get_runtime_context().get_job_id()
raylane.start_ray_in_background(num_cpus=1)  # Ray runs now: nothing happens
ensure_ray(1)
print("SAME RAY", ray.get_runtime_context().get_job_id() == job and ray.cluster_resources()["CPU"] == 2)
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("preload", [True, False])
def test_start_ray_in_background_preloads_worker_imports_and_leaves_a_running_ray_alone(
    preload: bool, tmp_path: Path
) -> None:
    script = tmp_path / "start.py"
    script.write_text(PRELOAD_SCRIPT.replace("PRELOAD", str(preload)))
    env = env_without_ray_address()
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = ["pytorch_lightning", "raylane.worker", "torch"] if preload else []
    assert f"IMPORTED {expected}" in done.stdout, done.stdout[-2000:]
    assert "SAME RAY True" in done.stdout, done.stdout[-2000:]
