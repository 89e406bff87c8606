"""Users import Lightning as ``pytorch_lightning`` or as ``lightning.pytorch``; raylane's strategies serve both.

The fits run as users' scripts in fresh processes, where only one namespace is imported and raylane has to find out
which; the rest checks, in this process (where both are imported), what a backend and Lightning's registry see.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import raylane
from raylane import BackendLoadError, ConfigurationError, get_strategy
from raylane.strategy import RayStrategyMixin

SCRIPTS = Path(__file__).parent / "lightning_scripts"
NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


def run_script(script: str, *args: str, cwd: Path) -> dict:
    """Run a user's script in a fresh interpreter (its own local Ray) and return the report it prints."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    reports = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and reports, f"{script} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return json.loads(reports[-1].removeprefix("REPORT "))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_script_importing_one_namespace_trains_on_two_workers_and_gets_the_weights_back(
    namespace: str, tmp_path: Path
) -> None:
    report = run_script("fit_in_namespace.py", namespace, "ddp", cwd=tmp_path)

    assert report["namespaces_imported"] == [namespace], "raylane imported the other Lightning"
    assert report["strategy_is_lightnings"]
    assert report["strategy_class"] == f"RayDDPStrategy.for_{namespace.replace('.', '_')}"
    assert report["world_size"] == 2.0
    assert report["trained_elsewhere"]
    assert report["global_step"] == 8  # 2 epochs x 4 batches per rank (64 samples, batch 8, 2 ranks)
    assert report["state"] == "finished"
    assert report["weights_moved"] > 0


@pytest.mark.timeout(300)
def test_lightning_cli_configures_the_strategy_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "configs" / "train.yaml"  # LightningCLI saves its own config.yaml in the run directory
    config.parent.mkdir()
    config.write_text(
        textwrap.dedent(
            """
            trainer:
              max_epochs: 2
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              strategy:
                class_path: raylane_ddp.strategy.RayDDPStrategy
                init_args:
                  workers: 2
                  cpus_per_worker: 1
            """
        )
    )

    report = run_script("cli_fit.py", "lightning.pytorch", "fit", "--config", str(config), cwd=tmp_path)

    assert report["strategy_class"] == "RayDDPStrategy.for_lightning_pytorch"
    assert (report["workers"], report["world_size"], report["trained_elsewhere"]) == (2, 2.0, True)
    assert report["current_epoch"] == 2
    assert report["weights_moved"] > 0


@pytest.mark.timeout(300)
def test_lightning_cli_configures_the_strategy_from_command_line_flags(tmp_path: Path) -> None:
    flags = ["--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    flags += ["--trainer.strategy", "raylane_ddp.strategy.RayDDPStrategy", "--trainer.strategy.workers", "2"]

    report = run_script("cli_fit.py", "pytorch_lightning", "fit", *flags, cwd=tmp_path)

    assert report["strategy_class"] == "RayDDPStrategy.for_pytorch_lightning"
    assert (report["workers"], report["world_size"], report["trained_elsewhere"]) == (2, 2.0, True)
    assert report["current_epoch"] == 1
    assert report["weights_moved"] > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_lightning_imported_after_raylane_still_knows_its_strategies(namespace: str, tmp_path: Path) -> None:
    script = f"""
        import raylane.testing  # imports raylane first, then pytorch_lightning
        import {namespace} as pl
        from raylane_ddp.strategy import RayDDPStrategy

        trainer = pl.Trainer(strategy="ray_ddp", logger=False, enable_progress_bar=False)
        assert isinstance(trainer.strategy, RayDDPStrategy), trainer.strategy
        assert trainer.strategy.launch_options.workers == 2
        assert issubclass(RayDDPStrategy, pl.strategies.Strategy)  # what LightningCLI checks a class path against
        print("REPORT {{}}")
    """
    (tmp_path / "late.py").write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "late.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "REPORT" in done.stdout, done.stderr[-4000:]


@pytest.mark.parametrize("backend", ["ddp", "sharded", "echo"])
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_backend_builds_a_strategy_the_namespaces_trainer_accepts(backend: str, namespace: str) -> None:
    import importlib

    lightning = importlib.import_module(namespace)

    strategy = get_strategy(backend, workers=2, lightning=namespace)

    assert isinstance(strategy, lightning.strategies.Strategy)
    trainer = lightning.Trainer(strategy=strategy, logger=False, enable_progress_bar=False)
    assert trainer.strategy is strategy
    copy = pickle.loads(pickle.dumps(strategy))  # as the workers receive it: the same class, found by name
    assert type(copy) is type(strategy)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_ray_backend_strings_are_registered_in_both_registries(namespace: str) -> None:
    import importlib

    lightning = importlib.import_module(namespace)
    raylane.register_with_lightning(namespace)

    trainer = lightning.Trainer(strategy="ray_ddp", logger=False, enable_progress_bar=False)

    assert isinstance(trainer.strategy, lightning.strategies.Strategy)
    assert trainer.strategy.launch_options.workers == 2


def test_with_both_namespaces_imported_get_strategy_asks_which() -> None:
    import lightning.pytorch  # noqa: F401
    import pytorch_lightning  # noqa: F401

    with pytest.raises(ConfigurationError, match=r"both pytorch_lightning and lightning\.pytorch are imported"):
        get_strategy("ddp", workers=2)
    with pytest.raises(ConfigurationError, match=r"lightning='lightning\.tensorflow' is not a Lightning namespace"):
        get_strategy("ddp", workers=2, lightning="lightning.tensorflow")


def test_a_backend_written_for_pytorch_lightning_only_keeps_working_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook's first form: no ``lightning`` argument, a class that lists pytorch_lightning's DDPStrategy."""
    from pytorch_lightning.strategies import DDPStrategy

    from raylane.strategy import RayClusterEnvironment

    class OldStyle(RayStrategyMixin, DDPStrategy):
        backend_name = "echo"

        def __init__(self, workers: int = 2, **options: object) -> None:
            self.init_ray_options({"workers": workers, **options})
            super().__init__(cluster_environment=RayClusterEnvironment())

    import raylane_echo

    monkeypatch.setattr(raylane_echo, "raylane_strategy_class", _old_style_hook(OldStyle))

    assert isinstance(get_strategy("echo", workers=2, lightning="pytorch_lightning"), OldStyle)
    with pytest.raises(BackendLoadError, match=r"Backend 'echo' has no strategy for lightning\.pytorch Trainers"):
        get_strategy("echo", workers=2, lightning="lightning.pytorch")


def _old_style_hook(strategy_class: type) -> object:
    @raylane.hookimpl
    def raylane_strategy_class() -> type:
        return strategy_class

    return raylane_strategy_class
