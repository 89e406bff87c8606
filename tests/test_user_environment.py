"""The user's own code and environment reach the workers: modules next to the script, env allow-list, runtime_env."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl

from raylane import get_strategy
from raylane.testing import ClassifierModel, ensure_local_ray, make_loader
from tests.conftest import read_reports


@pytest.mark.timeout(240)
def test_script_with_a_local_module_trains_from_another_directory(tmp_path: Path) -> None:
    """The laptop case: no Ray running (raylane starts one), model in a module beside the script, run from elsewhere."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "usermodel.py").write_text(
        textwrap.dedent(
            """
            from raylane.testing import ClassifierModel

            class UserModel(ClassifierModel):
                pass
            """
        )
    )
    (project / "train.py").write_text(
        textwrap.dedent(
            """
            import pytorch_lightning as pl
            import torch
            from raylane import get_strategy
            from raylane.testing import make_loader
            from usermodel import UserModel

            if __name__ == "__main__":
                model = UserModel()
                before = model.layer.weight.clone()
                trainer = pl.Trainer(max_epochs=1, strategy=get_strategy("ddp", workers=2), logger=False,
                                     enable_checkpointing=False, enable_progress_bar=False)
                trainer.fit(model, make_loader(8))
                print("TRAINED", not torch.equal(before, model.layer.weight), trainer.global_step)
            """
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, str(project / "train.py")], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TRAINED True 4" in result.stdout


@pytest.mark.timeout(180)
def test_only_allow_listed_driver_env_and_user_env_reach_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_local_ray()
    monkeypatch.setenv("NCCL_DEBUG", "INFO")  # allow-listed prefix
    monkeypatch.setenv("PL_GLOBAL_SEED", "123")  # allow-listed name
    monkeypatch.setenv("RAYLANE_TEST_SECRET", "x")  # RAYLANE_ prefix is forwarded too
    monkeypatch.setenv("MY_PRIVATE_TOKEN", "do-not-forward")
    names = (
        "NCCL_DEBUG",
        "PL_GLOBAL_SEED",
        "RAYLANE_TEST_SECRET",
        "MY_PRIVATE_TOKEN",
        "USER_GIVEN",
        "FROM_RUNTIME_ENV",
    )
    strategy = get_strategy(
        "ddp",
        workers=2,
        env={"USER_GIVEN": "yes"},
        runtime_env={"env_vars": {"FROM_RUNTIME_ENV": "also"}},
    )
    trainer = pl.Trainer(
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ClassifierModel(report_dir=str(tmp_path), report_env=names), make_loader(8))
    for report in read_reports(tmp_path):
        assert report["env"] == {
            "NCCL_DEBUG": "INFO",
            "PL_GLOBAL_SEED": "123",
            "RAYLANE_TEST_SECRET": "x",
            "MY_PRIVATE_TOKEN": None,
            "USER_GIVEN": "yes",
            "FROM_RUNTIME_ENV": "also",
        }
