"""Users import Lightning as ``pytorch_lightning`` or as ``lightning.pytorch``; raylane's strategies serve both.

Everything runs as users' scripts in fresh processes, where only one namespace is imported and raylane has to find out
which (this test process must not import ``lightning.pytorch`` next to ``pytorch_lightning``: every other test here
would then have to say which one it means).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raylane.testing import printed_report

SCRIPTS = Path(__file__).parent / "lightning_scripts"
NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


def run_script(script: str, *args: str, cwd: Path) -> dict:
    """Run a user's script in a fresh interpreter (its own local Ray) and return the report it prints."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return printed_report(done.stdout)


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
                class_path: raylane_sharded.strategy.RayShardedStrategy
                init_args:
                  workers: 2
                  cpus_per_worker: 1
                  engine: zero
            """
        )
    )

    report = run_script("cli_fit.py", "lightning.pytorch", "fit", "--config", str(config), cwd=tmp_path)

    assert report["strategy_class"] == "RayShardedStrategy.for_lightning_pytorch"
    assert report["backend_options"] == {"engine": "zero"}, "a backend's own option, set in YAML"
    assert (report["workers"], report["world_size"], report["trained_elsewhere"]) == (2, 2.0, True)
    assert report["current_epoch"] == 2
    assert report["weights_moved"] > 0


@pytest.mark.timeout(300)
def test_lightning_cli_configures_the_strategy_from_command_line_flags(tmp_path: Path) -> None:
    flags = ["--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    flags += ["--trainer.strategy", "raylane_ddp.strategy.RayDDPStrategy", "--trainer.strategy.workers", "2"]
    flags += ["--trainer.strategy.static_graph", "true"]  # one of the backend's own options

    report = run_script("cli_fit.py", "pytorch_lightning", "fit", *flags, cwd=tmp_path)

    assert report["strategy_class"] == "RayDDPStrategy.for_pytorch_lightning"
    assert report["backend_options"] == {"static_graph": True}
    assert (report["workers"], report["world_size"], report["trained_elsewhere"]) == (2, 2.0, True)
    assert report["current_epoch"] == 1
    assert report["weights_moved"] > 0


@pytest.mark.timeout(300)
def test_lightning_cli_takes_ray_lightnings_strategy_by_class_path(tmp_path: Path) -> None:
    """ray_lightning's CLI form: raylane.compat's names are classes (construction returns the raylane strategy)."""
    flags = ["--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    flags += ["--trainer.strategy", "raylane.compat.RayStrategy", "--trainer.strategy.num_workers", "2"]

    report = run_script("cli_fit.py", "pytorch_lightning", "fit", *flags, cwd=tmp_path)

    assert report["strategy_class"] == "RayDDPStrategy.for_pytorch_lightning"
    assert (report["workers"], report["world_size"], report["trained_elsewhere"]) == (2, 2.0, True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_backends_registry_and_ambiguity_as_a_process_importing_one_namespace_sees_them(
    namespace: str, tmp_path: Path
) -> None:
    report = run_script("namespace_checks.py", namespace, cwd=tmp_path)
    suffix = namespace.replace(".", "_")

    assert report["accepted"] == {"ddp": True, "sharded": True, "echo": True}
    assert report["registry_string"] == [f"RayDDPStrategy.for_{suffix}", 2]  # Lightning was imported after raylane
    assert report["class_path_is_a_strategy"]
    assert "both pytorch_lightning and lightning.pytorch are imported" in report["both_imported"]
    assert "pass lightning='lightning.pytorch' or lightning='pytorch_lightning'" in report["both_imported"]
    assert report["explicit"] == f"RayDDPStrategy.for_{suffix}"
    assert "lightning='lightning.tensorflow' is not a Lightning namespace" in report["not_a_namespace"]
    # A backend written for pytorch_lightning only keeps working there, and says why it cannot serve the other.
    assert report["old_style"]["pytorch_lightning"] == "OldStyle"
    assert report["old_style"]["lightning.pytorch"].startswith(
        "BackendLoadError: Backend 'echo' has no strategy for lightning.pytorch Trainers"
    )
