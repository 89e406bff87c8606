"""Engine choice and options: checked on the driver, before any actor starts, with messages that say what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

from raylane import BackendLoadError, ConfigurationError, get_strategy
from raylane.testing import ClassifierModel, ensure_local_ray, make_loader, quiet_trainer
from raylane.testing.equivalence import assert_separate_optimizers_need_then_train_with
from raylane_sharded import DEFAULT_ENGINE, ENGINE_OPTIONS, ENGINES
from raylane_sharded.strategy import RayShardedStrategy

README = Path(__file__).resolve().parents[1] / "README.md"


def test_default_engine_is_fairscale() -> None:
    strategy = get_strategy("sharded", workers=2)
    assert isinstance(strategy, RayShardedStrategy)
    assert strategy.engine_spec.name == "fairscale"


def test_lightning_strategy_name_uses_the_default_engine() -> None:
    trainer = pl.Trainer(strategy="ray_sharded", logger=False, enable_progress_bar=False)
    assert trainer.strategy.engine_spec.name == "fairscale"  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", [*ENGINES])
def test_every_engine_builds_a_strategy(engine: str) -> None:
    assert get_strategy("sharded", workers=2, engine=engine).engine_spec.name == engine  # type: ignore[attr-defined]


def test_engine_none_is_the_default_engine() -> None:
    # What LightningCLI passes when the YAML names no engine.
    assert get_strategy("sharded", workers=2, engine=None).engine_spec.name == DEFAULT_ENGINE  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", ["deepspeed", "FAIRSCALE", "", 3])
def test_unknown_engine_lists_the_valid_ones(engine: object) -> None:
    with pytest.raises(ConfigurationError, match="Unknown engine") as info:
        get_strategy("sharded", workers=2, engine=engine)
    for name in ENGINES:
        assert repr(name) in str(info.value)


def test_option_of_another_engine_names_its_engine() -> None:
    with pytest.raises(ConfigurationError, match="reduce_buffer_size is for engine 'fairscale'") as info:
        get_strategy("sharded", workers=2, engine="zero", reduce_buffer_size=2**20)
    assert "find_unused_parameters" in str(info.value), "the message lists what the chosen engine takes"


def test_unknown_option_lists_the_engine_options() -> None:
    with pytest.raises(ConfigurationError, match="reduce_bufer_size") as info:
        get_strategy("sharded", workers=2, reduce_bufer_size=0)
    assert "reduce_buffer_size" in str(info.value) and "engine" in str(info.value)


def test_options_pass_through_to_the_engine() -> None:
    options = {"reduce_buffer_size": 2**20, "broadcast_buffers": False, "auto_refresh_trainable": False}
    strategy = get_strategy("sharded", workers=2, broadcast_fp16=True, **options)
    engine = strategy.engine  # type: ignore[attr-defined]
    assert (engine.reduce_buffer_size, engine.broadcast_buffers, engine.auto_refresh_trainable) == (2**20, False, False)
    assert engine.broadcast_fp16 is True


def test_zero_engine_ddp_options_reach_ddp() -> None:
    strategy = get_strategy("sharded", workers=2, engine="zero", find_unused_parameters=True, broadcast_buffers=False)
    assert strategy.engine_spec.ddp_kwargs(strategy.engine_options) == {  # type: ignore[attr-defined]
        "find_unused_parameters": True,
        "broadcast_buffers": False,
    }


def test_missing_fairscale_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fairscale", None)  # what Python does for a module that cannot be imported
    with pytest.raises(BackendLoadError, match=r"pip install fairscale==0\.4\.13") as info:
        get_strategy("sharded", workers=2)
    assert "'zero'" in str(info.value), "the message offers the engine that needs no extra package"
    assert isinstance(info.value, ImportError)
    get_strategy("sharded", workers=2, engine="zero")  # the other engine still works


def test_entry_module_and_driver_strategy_import_no_engine() -> None:
    heavy = ("fairscale", "raylane_sharded.strategy", "raylane_sharded.fairscale_engine", "raylane_sharded.zero_engine")
    loaded = f"[m for m in {heavy!r} if m in sys.modules]"
    code = (
        f"import sys, raylane_sharded; print({loaded}); "
        f"import raylane; raylane.get_strategy('sharded', workers=2, lightning='pytorch_lightning'); print({loaded})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    listing, after_get_strategy = result.stdout.strip().splitlines()
    assert listing == "[]", "the entry module imports only hook implementations"
    assert after_get_strategy == "['raylane_sharded.strategy']", "the driver checks the engine without importing it"


@pytest.mark.parametrize("name", [*ENGINE_OPTIONS, *ENGINES])
def test_readme_documents_every_engine_and_option(name: str) -> None:
    assert f"`{name}`" in README.read_text()


class ReportsFairScale(ClassifierModel):
    """Logs what FairScale's objects on the worker were built with (27 parameters: buckets hold at most that)."""

    def on_train_start(self) -> None:
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS

        wrapped, (optimizer,) = self.trainer.strategy.model, self.trainer.optimizers
        assert isinstance(wrapped, ShardedDataParallel) and isinstance(optimizer, OSS), (wrapped, optimizer)
        self.log("bucket_elements", float(wrapped._buffer_max_size), rank_zero_only=True)
        self.log("auto_refresh", float(wrapped._auto_refresh_trainable), rank_zero_only=True)
        self.log("broadcast_fp16", float(optimizer.broadcast_fp16), rank_zero_only=True)


@pytest.mark.timeout(180)
def test_fairscale_options_reach_sharded_data_parallel_and_oss_on_the_workers() -> None:
    ensure_local_ray()
    options = {"reduce_buffer_size": 16, "auto_refresh_trainable": False, "broadcast_fp16": True}
    strategy = get_strategy("sharded", workers=2, idle_timeout=0, **options)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, enable_checkpointing=False)
    trainer.fit(ReportsFairScale(), make_loader(8))
    reported = {
        name: float(trainer.callback_metrics[name]) for name in ("bucket_elements", "auto_refresh", "broadcast_fp16")
    }
    assert reported == {"bucket_elements": 16.0, "auto_refresh": 0.0, "broadcast_fp16": 1.0}


@pytest.mark.timeout(180)
def test_unused_parameters_under_fairscale_fail_naming_the_zero_engine_which_trains_with_them(tmp_path: Path) -> None:
    # FairScale's ShardedDataParallel asserts, with no message, when a backward pass leaves a parameter without a
    # gradient; the zero engine's DDP can skip such parameters when asked.
    ensure_local_ray()
    remedy = "get_strategy('sharded', workers=..., engine='zero', find_unused_parameters=True)"
    accepting = {"engine": "zero", "find_unused_parameters": True}
    assert_separate_optimizers_need_then_train_with("sharded", tmp_path, remedy, {"engine": "fairscale"}, accepting)
