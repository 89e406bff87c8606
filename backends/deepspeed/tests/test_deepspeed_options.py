"""Options, the DeepSpeed config they make, and bad input: all checked on the driver, before any actor starts."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl

from raylane import BackendLoadError, ConfigurationError, get_strategy, list_backends
from raylane.options import LaunchOptions
from raylane.registry import backend_host
from raylane_deepspeed import BACKEND_OPTIONS
from raylane_deepspeed.strategy import RayDeepSpeedStrategy

README = Path(__file__).resolve().parents[1] / "README.md"


def config_of(**options: Any) -> dict[str, Any]:
    strategy = get_strategy("deepspeed", workers=2, **options)
    assert isinstance(strategy, RayDeepSpeedStrategy)
    return strategy.config  # type: ignore[return-value]


# -- registry, entry point, both Lightning namespaces --------------------------------------------------------------


def test_entry_point_names_the_backend_module() -> None:
    [entry] = [e for e in importlib.metadata.entry_points(group="raylane.backends") if e.name == "deepspeed"]
    assert entry.value == "raylane_deepspeed"
    [listed] = [backend for backend in list_backends() if backend.name == "deepspeed"]
    assert listed.distribution == "raylane-deepspeed"


def test_backend_module_imports_neither_deepspeed_nor_the_strategy() -> None:
    heavy = "('deepspeed', 'raylane_deepspeed.strategy')"
    probe = f"import sys, raylane_deepspeed; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_lightning_strategy_name_builds_the_default_stage() -> None:
    trainer = pl.Trainer(strategy="ray_deepspeed", logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, RayDeepSpeedStrategy)
    assert trainer.strategy.zero_stage == 2


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_strategy_is_a_deepspeed_strategy_of_either_namespace(namespace: str) -> None:
    # In a process of its own: with both namespaces imported, every get_strategy call would have to name one.
    probe = f"""
import {namespace} as lightning
from raylane import get_strategy
from raylane_deepspeed.strategy import RayDeepSpeedStrategy
strategy = get_strategy("deepspeed", workers=2, stage=3)
assert isinstance(strategy, lightning.strategies.DeepSpeedStrategy), type(strategy).__mro__
assert isinstance(strategy, RayDeepSpeedStrategy)
assert lightning.Trainer(strategy=strategy, logger=False).strategy is strategy
assert lightning.Trainer(strategy="ray_deepspeed", logger=False).strategy.zero_stage == 2
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_option_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [name for name in BACKEND_OPTIONS if f"`{name}`" not in text]
    assert not missing, f"backends/deepspeed/README.md does not document {missing}"


def test_placement_is_one_bundle_per_worker() -> None:
    host = backend_host("deepspeed")
    assert host.placement_bundles(LaunchOptions(workers=3, cpus_per_worker=2)) == [{"CPU": 2.0}] * 3
    gpus = host.placement_bundles(LaunchOptions(workers=2, use_gpu=True))
    assert [bundle.get("GPU") for bundle in gpus] == [1.0, 1.0]


# -- the config the options make ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_reaches_the_deepspeed_config(stage: int) -> None:
    assert config_of(stage=stage)["zero_optimization"]["stage"] == stage


def test_default_is_stage_two_without_offload() -> None:
    zero = config_of()["zero_optimization"]
    assert zero["stage"] == 2
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_offload_options_make_offload_sections() -> None:
    zero = config_of(stage=3, offload_optimizer=True, offload_parameters=True, pin_memory=True)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_optimizer"]["pin_memory"] is True
    assert zero["offload_param"]["device"] == "cpu"


def test_offload_on_cpu_workers_keeps_the_modules_own_optimizer() -> None:
    # DeepSpeed would otherwise demand its compiled DeepSpeedCPUAdam.
    assert config_of(offload_optimizer=True)["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in config_of(offload_optimizer=True, use_gpu=True)


def test_config_dict_passes_through_and_options_fill_in() -> None:
    given = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}, "steps_per_print": 7}
    config = config_of(config=given, offload_optimizer=True, allgather_bucket_size=500)
    assert config["steps_per_print"] == 7
    assert config["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 1000,
        "allgather_bucket_size": 500,
        "offload_optimizer": {"device": "cpu"},
    }
    assert config["zero_allow_untested_optimizer"] is True  # the LightningModule's torch optimizer is allowed
    assert given == {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}, "steps_per_print": 7}, "not mutated"


def test_config_file_is_read_on_the_driver(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "wall_clock_breakdown": False}))
    config = config_of(config=str(path))
    assert config["zero_optimization"]["stage"] == 1 and config["wall_clock_breakdown"] is False
    assert config_of(config=path)["zero_optimization"]["stage"] == 1


def test_option_agreeing_with_the_config_is_accepted() -> None:
    assert config_of(config={"zero_optimization": {"stage": 3}}, stage=3)["zero_optimization"]["stage"] == 3


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 4, "3", True, 2.0])
def test_invalid_stage_names_the_valid_ones(stage: object) -> None:
    with pytest.raises(ConfigurationError, match=r"stage=.*use 1 .*2 .*3"):
        get_strategy("deepspeed", workers=2, stage=stage)


def test_parameter_offload_needs_stage_three() -> None:
    with pytest.raises(ConfigurationError, match="needs ZeRO stage 3, but the stage is 2"):
        get_strategy("deepspeed", workers=2, offload_parameters=True)
    with pytest.raises(ConfigurationError, match="needs ZeRO stage 3, but the stage is 1"):
        get_strategy(
            "deepspeed", workers=2, config={"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}
        )


def test_option_contradicting_the_config_names_both() -> None:
    with pytest.raises(ConfigurationError, match=r"stage=3 contradicts config\['zero_optimization'\]\['stage'\]=2"):
        get_strategy("deepspeed", workers=2, stage=3, config={"zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigurationError, match=r"offload_optimizer=False contradicts"):
        get_strategy(
            "deepspeed",
            workers=2,
            offload_optimizer=False,
            config={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        )


def test_offload_details_with_a_config_point_into_the_config() -> None:
    with pytest.raises(ConfigurationError, match="offload_optimizer / offload_param sections"):
        get_strategy("deepspeed", workers=2, offload_optimizer=True, nvme_path="/nvme", config={})


def test_missing_config_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no such file") as info:
        get_strategy("deepspeed", workers=2, config=str(tmp_path / "missing.json"))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(("content", "message"), [("{stage: 2", "not a readable JSON file"), ("[1, 2]", "JSON list")])
def test_bad_config_file_is_rejected(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        get_strategy("deepspeed", workers=2, config=path)


def test_config_of_another_type_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="config must be a DeepSpeed config dict or the path"):
        get_strategy("deepspeed", workers=2, config=3)


def test_gradient_accumulation_belongs_to_the_trainer() -> None:
    with pytest.raises(ConfigurationError, match="accumulate_grad_batches"):
        get_strategy("deepspeed", workers=2, config={"gradient_accumulation_steps": 4})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"offload_optimizer": "yes"}, "offload_optimizer must be True or False"),
        ({"offload_optimizer": True, "offload_optimizer_device": "disk"}, "'cpu', 'nvme'"),
        ({"offload_parameters": False, "offload_params_device": "nvme"}, "drop one"),
        ({"reduce_bucket_size": 0}, "reduce_bucket_size must be a whole number"),
    ],
)
def test_invalid_option_values_are_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        get_strategy("deepspeed", workers=2, **options)


def test_workers_sharing_a_gpu_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"gpus_per_worker=0\.5 puts several workers on one GPU"):
        get_strategy("deepspeed", workers=2, use_gpu=True, gpus_per_worker=0.5)


def test_missing_deepspeed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what Python does for a module that cannot be imported
    with pytest.raises(BackendLoadError, match=r"--no-build-isolation \"deepspeed==0\.19\.8\""):
        get_strategy("deepspeed", workers=2)
