"""raylane.compat: a ray_lightning script keeps its strategy lines and trains; every argument means what it meant."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from raylane import ConfigurationError, WorkerError, get_strategy
from raylane.compat import HorovodRayStrategy, MigrationWarning, RayShardedStrategy, RayStrategy
from raylane.testing import ClassifierModel, assert_released, ensure_local_ray, make_loader


def _hook() -> None:
    """An init_hook that does nothing (module level, so workers can import it)."""


def mark_worker(directory: str) -> None:
    """An init_hook that leaves this worker's pid in ``directory``."""
    (Path(directory) / f"init-{os.getpid()}").touch()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("shim", [RayStrategy, RayShardedStrategy])
def test_a_shim_with_two_workers_trains_like_ray_lightning(shim: Any, tmp_path: Path) -> None:
    ensure_local_ray()
    torch.manual_seed(0)
    model = ClassifierModel()
    initial = model.layer.weight.detach().clone()
    hooked = tmp_path / "hooked"
    hooked.mkdir()
    init_hook = functools.partial(mark_worker, str(hooked))
    trainer = pl.Trainer(
        strategy=shim(num_workers=2, num_cpus_per_worker=1, use_gpu=False, init_hook=init_hook),
        max_epochs=2,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, make_loader(8, samples=64), make_loader(8, samples=32))

    assert trainer.state.finished and trainer.current_epoch == 2
    assert trainer.global_step == 8, "64 samples in batches of 8 over 2 workers: 4 steps per epoch"
    assert not torch.equal(initial, model.layer.weight)
    assert len(list(hooked.iterdir())) == 2, "init_hook runs once on each of the 2 workers"
    saved = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["layer.weight"], model.layer.weight)
    trainer.strategy.release_workers()  # warm for a next entry point until then
    assert_released()


def _launch(strategy: Any) -> dict[str, Any]:
    options = strategy.launch_options
    return {
        "workers": options.workers,
        "cpus": options.cpus_per_worker,
        "gpus": options.gpus,
        "custom": dict(options.resources_per_worker),
    }


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, {"workers": 1, "cpus": 1, "gpus": 0, "custom": {}}),
        (
            {"num_workers": 3, "num_cpus_per_worker": 2, "use_gpu": True},
            {"workers": 3, "cpus": 2, "gpus": 1, "custom": {}},
        ),
        # resources_per_worker's "CPU" and "GPU" override the other arguments; any GPUs turn use_gpu on, none off.
        (
            {"num_cpus_per_worker": 1, "resources_per_worker": {"CPU": 3}},
            {"workers": 1, "cpus": 3, "gpus": 0, "custom": {}},
        ),
        ({"use_gpu": False, "resources_per_worker": {"GPU": 2}}, {"workers": 1, "cpus": 1, "gpus": 2, "custom": {}}),
        ({"use_gpu": True, "resources_per_worker": {"GPU": 0}}, {"workers": 1, "cpus": 1, "gpus": 0, "custom": {}}),
        (
            {"num_workers": 2, "resources_per_worker": {"CPU": 0.5, "ssd": 1}},
            {"workers": 2, "cpus": 0.5, "gpus": 0, "custom": {"ssd": 1}},
        ),
    ],
)
def test_ray_strategy_arguments_become_the_same_ray_reservation(
    arguments: dict[str, Any], expected: dict[str, Any]
) -> None:
    given = {k: dict(v) if isinstance(v, dict) else v for k, v in arguments.items()}
    strategy = RayStrategy(**arguments)
    assert strategy.backend_name == "ddp"
    assert _launch(strategy) == expected
    assert arguments == given, "ray_lightning popped keys out of the caller's dict; raylane leaves it alone"


def test_ddp_kwargs_become_ddp_backend_options_and_init_hook_a_launch_option() -> None:
    # That the hook then runs on every worker: test_a_shim_with_two_workers_trains_like_ray_lightning.
    strategy = RayStrategy(num_workers=2, init_hook=_hook, find_unused_parameters=True, bucket_cap_mb=5)
    assert strategy.backend_options == {"find_unused_parameters": True, "bucket_cap_mb": 5}
    assert strategy.launch_options.init_hook is _hook


def test_fractional_gpus_need_gloo_which_the_old_environment_variable_still_selects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ray_lightning only warned, and training failed later in NCCL; raylane says so at once.
    with pytest.raises(ConfigurationError, match="process_group_backend='gloo'"):
        RayStrategy(num_workers=2, resources_per_worker={"GPU": 0.5})
    monkeypatch.setenv("PL_TORCH_DISTRIBUTED_BACKEND", "gloo")  # what ray_lightning told users to set
    with pytest.warns(MigrationWarning, match="process_group_backend='gloo'"):
        strategy = RayStrategy(num_workers=2, resources_per_worker={"GPU": 0.5})
    assert strategy.backend_options["process_group_backend"] == "gloo"
    assert strategy.launch_options.gpus == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit option wins, silently
        explicit = RayStrategy(num_workers=2, use_gpu=True, process_group_backend="nccl")
    assert explicit.backend_options["process_group_backend"] == "nccl"


@pytest.mark.parametrize(
    ("argument", "advice"),
    [
        ({"checkpoint_io": object()}, r"Trainer\(plugins="),
        ({"precision_plugin": object()}, r"Trainer\(plugins="),
        ({"sync_batchnorm": True}, r"Trainer\(sync_batchnorm=True\)"),
        ({"num_nodes": 2}, "num_workers"),
        ({"cluster_environment": object()}, "ranks from Ray"),
        ({"resources_per_worker": {"gpu": 1}}, "Ray spells it 'GPU'"),
        ({"num_workers": 2, "workers": 4}, "give each setting once"),
    ],
)
def test_arguments_that_no_longer_mean_anything_fail_with_what_to_do(argument: dict[str, Any], advice: str) -> None:
    with pytest.raises(ConfigurationError, match=advice):
        RayStrategy(**argument)


def test_device_arguments_are_ignored_with_a_warning() -> None:
    with pytest.warns(MigrationWarning, match=r"device_ids=...\) is ignored"):
        strategy = RayStrategy(num_workers=2, device_ids=[0])
    assert "device_ids" not in strategy.backend_options


def test_an_unknown_ddp_argument_fails_listing_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"dim.*Valid options are: .*find_unused_parameters"):
        RayStrategy(num_workers=2, dim=1)


def test_sharded_strategy_is_fairscale_sharding_with_its_arguments() -> None:
    strategy = RayShardedStrategy(num_workers=2, resources_per_worker={"CPU": 2}, reduce_buffer_size=0)
    assert strategy.backend_name == "sharded"
    assert strategy.backend_options == {"engine": "fairscale", "reduce_buffer_size": 0}
    assert _launch(strategy) == {"workers": 2, "cpus": 2, "gpus": 0, "custom": {}}
    assert RayShardedStrategy(num_workers=2, engine="zero").backend_options == {"engine": "zero"}


def test_horovod_strategy_needs_num_workers_like_ray_lightning() -> None:
    with pytest.raises(TypeError, match="num_workers"):
        HorovodRayStrategy()  # type: ignore[call-arg]


# HorovodRayStrategy's arguments on a built Horovod: backends/horovod/tests/test_horovod_ray_lightning_compat.py, in
# the horovod session, which builds Horovod (the integration session does not, to stay lean).


def test_ray_lightning_attributes_are_read_only_views_of_the_launch_options() -> None:
    strategy = RayStrategy(num_workers=3, num_cpus_per_worker=2, use_gpu=True)
    seen = (strategy.num_workers, strategy.num_cpus_per_worker, strategy.num_gpus_per_worker, strategy.use_gpu)
    assert seen == (3, 2, 1.0, True)
    sharded = RayShardedStrategy(num_workers=2, resources_per_worker={"CPU": 2, "GPU": 0.5}, engine="zero")
    assert (sharded.num_workers, sharded.num_cpus_per_worker, sharded.num_gpus_per_worker) == (2, 2, 0.5)
    native = get_strategy("ddp", workers=2)  # raylane's own strategies have the same names
    assert (native.num_workers, native.num_cpus_per_worker, native.num_gpus_per_worker, native.use_gpu) == (
        2,
        1,
        0,
        False,
    )
    with pytest.raises(AttributeError):
        strategy.num_workers = 4  # a view: change the options when building the strategy instead


class RaisesValueError(ClassifierModel):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_rank == 1:
            raise ValueError("a bad batch on rank 1")
        return super().training_step(batch, batch_idx)


@pytest.mark.timeout(240)
def test_a_workers_exception_is_caught_by_its_own_class_as_under_ray_lightning(tmp_path: Path) -> None:
    ensure_local_ray()
    trainer = pl.Trainer(
        strategy=RayStrategy(num_workers=2, idle_timeout=0),
        max_epochs=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="a bad batch on rank 1") as info:
        trainer.fit(RaisesValueError(), make_loader(8))
    assert isinstance(info.value, WorkerError) and info.value.worker_exception_class is ValueError
    assert info.value.rank == 1 and "in training_step" in str(info.value), "the worker's traceback"
    assert_released()
