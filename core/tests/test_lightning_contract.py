"""Fails by name when a Lightning release changes a private API raylane depends on (all of it is in raylane._lightning).

Each check runs against both namespaces, ``pytorch_lightning`` and ``lightning.pytorch`` (the unified ``lightning``
package). If one fails after a Lightning upgrade, adapt raylane/_lightning.py; nothing else in raylane
reaches into Lightning's internals.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from raylane import _lightning
from raylane.launcher import RayLauncher
from raylane.strategy import RayClusterEnvironment


@pytest.fixture(params=_lightning.NAMESPACES)
def lightning(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)  # core's testing extra installs both packages


def test_launcher_interface_is_what_the_ray_launcher_implements(lightning: ModuleType) -> None:
    launcher = _lightning.launcher_base(lightning)
    assert launcher.__module__ == f"{lightning.__name__}.strategies.launchers.launcher"
    abstract = set(getattr(launcher, "__abstractmethods__", set()))
    assert abstract == {"launch", "kill", "is_interactive_compatible"}, abstract
    assert abstract <= set(dir(RayLauncher))
    params = list(inspect.signature(launcher.launch).parameters)
    assert params[:2] == ["self", "function"]


def test_strategies_build_their_launcher_in_configure_launcher(lightning: ModuleType) -> None:
    ddp = lightning.strategies.DDPStrategy
    assert callable(getattr(ddp, "_configure_launcher", None))

    class Probe(_lightning.LauncherSlot, ddp):  # type: ignore[misc,valid-type]
        built = 0

        def make_launcher(self) -> None:
            Probe.built += 1

    lightning.Trainer(strategy=Probe(), accelerator="cpu", logger=False)
    assert Probe.built == 1, "Lightning no longer calls Strategy._configure_launcher while building the Trainer"


def test_the_cluster_environment_has_every_method_lightning_declares(lightning: ModuleType) -> None:
    base = _lightning.fabric(lightning).plugins.environments.ClusterEnvironment
    declared = {name for name, _ in inspect.getmembers(base) if not name.startswith("_")}
    assert declared <= set(dir(RayClusterEnvironment)), declared - set(dir(RayClusterEnvironment))


def test_trainer_functions_have_the_values_raylane_compares_with(lightning: ModuleType) -> None:
    states = lightning.trainer.states
    assert states.TrainerFn.FITTING == _lightning.FITTING
    assert states.TrainerFn.PREDICTING == _lightning.PREDICTING


def test_predict_records_the_sample_indices_of_each_batch(lightning: ModuleType) -> None:
    class Predictor(lightning.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0])

    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.predict(Predictor(), DataLoader(TensorDataset(torch.randn(5, 2)), batch_size=2))
    assert _lightning.predict_batch_indices(trainer) == [[[0, 1], [2, 3], [4]]]
    assert _lightning.namespace_of(trainer) is lightning


@pytest.mark.parametrize("entry_point", ["_fit_impl", "_validate_impl", "_test_impl", "_predict_impl"])
def test_entry_points_take_ckpt_path_by_that_name(lightning: ModuleType, entry_point: str) -> None:
    """raylane reads ckpt_path (remote storage checks) and replaces it (restarts) by name in these functions."""
    trainer = lightning.Trainer(accelerator="cpu", logger=False)
    function = getattr(trainer, entry_point)
    assert "ckpt_path" in inspect.signature(function).parameters
    assert _lightning.ckpt_path_of(function, (None,), {"ckpt_path": "s3://bucket/last.ckpt"}) == "s3://bucket/last.ckpt"
    assert _lightning.ckpt_path_of(function, (None,), {}) is None


def test_model_parallel_strategy_builds_its_mesh_from_the_size_raylane_sets(lightning: ModuleType) -> None:
    """The fsdp backend's elastic runs resize the mesh on the workers (``_lightning.set_data_parallel_size``)."""
    strategy_class = getattr(lightning.strategies, "ModelParallelStrategy", None)
    if strategy_class is None:
        pytest.skip(f"{lightning.__name__} {lightning.__version__} has no ModelParallelStrategy (Lightning < 2.4)")
    strategy = strategy_class(data_parallel_size=4, tensor_parallel_size=1)
    _lightning.set_data_parallel_size(strategy, 2)
    assert strategy._data_parallel_size == 2
    assert "self._data_parallel_size" in inspect.getsource(strategy_class.setup_environment)


def test_the_loop_says_which_batches_end_in_an_optimizer_step(lightning: ModuleType) -> None:
    """The deepspeed backend tells DeepSpeed's engine before each backward whether a step follows
    (``_lightning.steps_after_this_batch``): every accumulate_grad_batches batches and after the epoch's last one."""
    seen: list[bool] = []

    class Record(lightning.Callback):  # type: ignore[name-defined,misc]
        def on_before_backward(self, trainer: object, module: object, loss: object) -> None:
            seen.append(_lightning.steps_after_this_batch(trainer))  # type: ignore[arg-type]

    model = importlib.import_module(f"{lightning.__name__}.demos.boring_classes").BoringModel()
    data = DataLoader(TensorDataset(torch.randn(8, 32)), batch_size=1, collate_fn=lambda rows: rows[0][0])
    flags = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = lightning.Trainer(max_epochs=2, accumulate_grad_batches=3, callbacks=[Record()], **flags)
    trainer.fit(model, data)
    assert seen == [False, False, True, False, False, True, False, True] * 2
    assert trainer.global_step == 6


def test_an_entry_point_given_a_compiled_model_marks_the_module_it_unwraps(lightning: ModuleType) -> None:
    """raylane refuses a ``torch.compile``'d model before pickling it, saying how to compile on the workers instead
    (``_lightning.compiled_by_torch_compile``): the mark Lightning leaves on the module it unwraps."""
    marks: list[bool] = []

    class Record(lightning.Callback):  # type: ignore[name-defined,misc]
        def on_fit_start(self, trainer: object, module: object) -> None:
            marks.append(_lightning.compiled_by_torch_compile(module))

    model = importlib.import_module(f"{lightning.__name__}.demos.boring_classes").BoringModel()
    flags = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    lightning.Trainer(max_steps=1, callbacks=[Record()], **flags).fit(model)
    lightning.Trainer(max_steps=1, callbacks=[Record()], **flags).fit(torch.compile(model, backend="eager"))
    assert marks == [False, True]


def test_configure_model_runs_inside_the_strategys_model_sharded_context_before_its_setup(
    lightning: ModuleType,
) -> None:
    """Layers only ``configure_model`` builds take the weights the driver kept for them when the strategy's
    ``model_sharded_context`` exits (``RayStrategyMixin.model_sharded_context``): Lightning must enter it around that
    hook alone, and set the strategy up (wrapping, optimizers) only after it."""
    events: list[str] = []

    class Recording(lightning.strategies.SingleDeviceStrategy):  # type: ignore[name-defined,misc]
        @contextmanager
        def model_sharded_context(self) -> Iterator[None]:
            events.append("enter")
            yield
            events.append("exit")

        def setup(self, trainer: object) -> None:
            events.append("setup")
            super().setup(trainer)

    boring = importlib.import_module(f"{lightning.__name__}.demos.boring_classes").BoringModel

    class BuildsInConfigureModel(boring):  # type: ignore[misc,valid-type]
        def configure_model(self) -> None:
            events.append("configure_model")

    flags = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = lightning.Trainer(strategy=Recording(device=torch.device("cpu")), max_steps=1, **flags)
    trainer.fit(BuildsInConfigureModel())
    assert events == ["enter", "configure_model", "exit", "setup"], events


def test_a_learning_rate_search_ends_the_fit_with_the_tuner_exit_and_is_read_and_adopted(
    lightning: ModuleType, tmp_path: Path
) -> None:
    """Tuner(trainer).lr_find's fit ends, on a worker, with the exception ``tuner_exit`` names; raylane finishes the
    run as Lightning's entry point does, reads what the search found and sets, and gives both to the driver."""

    class Searched(lightning.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.lr = 0.1
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    finder = lightning.callbacks.LearningRateFinder(num_training_steps=20)
    finder._early_exit = True  # what Tuner.lr_find sets: the fit ends once the search is done
    flags = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, callbacks=[finder], default_root_dir=str(tmp_path), **flags
    )
    torch.manual_seed(0)  # a search whose losses give a suggestion
    model = Searched()
    trainer.state.fn = lightning.trainer.states.TrainerFn.FITTING  # as fit() sets it before the launcher runs
    trainer.training = True
    with pytest.raises(_lightning.tuner_exit(trainer)):
        trainer._fit_impl(model, DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=2))  # what a worker runs
    _lightning.finish_after_tuner_exit(trainer)
    assert trainer.state.status == lightning.trainer.states.TrainerStatus.FINISHED
    [(found, attribute, value)] = _lightning.learning_rate_searches(trainer)
    assert found is finder.optimal_lr and found.suggestion() is not None
    assert (attribute, value) == ("lr", model.lr) and model.lr == found.suggestion()
    finder.optimal_lr, model.lr = None, 0.1  # the driver's callback and model, before the worker's answer
    _lightning.adopt_learning_rate_searches(trainer, [(found, attribute, value)])
    assert finder.optimal_lr is found and model.lr == found.suggestion()
