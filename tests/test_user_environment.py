"""The user's own code and environment reach the workers: modules next to the script, env allow-list, runtime_env."""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl

from raylane import _ray, get_strategy
from raylane.testing import (
    ClassifierModel,
    assert_released,
    ensure_local_ray,
    env_without_ray_address,
    make_loader,
    quiet_trainer,
)
from tests.conftest import read_reports

upload_local_code = _ray.upload_local_code  # the real one, which the runtime_env test counts calls of


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
    env = env_without_ray_address()
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
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, enable_checkpointing=False)
    trainer.fit(ClassifierModel(report_dir=str(tmp_path), report_env=names), make_loader(8))
    reports = read_reports(tmp_path)
    assert [report["global_rank"] for report in reports] == [0, 1], "every worker must report what it saw"
    for report in reports:
        assert report["env"] == {
            "NCCL_DEBUG": "INFO",
            "PL_GLOBAL_SEED": "123",
            "RAYLANE_TEST_SECRET": "x",
            "MY_PRIVATE_TOKEN": None,
            "USER_GIVEN": "yes",
            "FROM_RUNTIME_ENV": "also",
        }


def _quiet_trainer(strategy: object, **overrides: object) -> pl.Trainer:
    return quiet_trainer(strategy=strategy, **{"max_epochs": 1, "enable_checkpointing": False, **overrides})


def mark_worker(directory: str) -> None:
    """An init_hook (module level, so the workers import it by name): leaves this worker's pid in ``directory``."""
    (Path(directory) / f"init-{os.getpid()}").touch()


@pytest.mark.timeout(180)
def test_init_hook_runs_once_on_every_worker_before_training(tmp_path: Path) -> None:
    ensure_local_ray()
    hook_dir, report_dir = tmp_path / "hooks", tmp_path / "reports"
    hook_dir.mkdir()
    report_dir.mkdir()
    strategy = get_strategy("ddp", workers=2, init_hook=functools.partial(mark_worker, str(hook_dir)), idle_timeout=0)
    _quiet_trainer(strategy).fit(ClassifierModel(report_dir=str(report_dir)), make_loader(8))
    training_pids = sorted(report["pid"] for report in read_reports(report_dir))
    hooked_pids = sorted(int(path.name.removeprefix("init-")) for path in hook_dir.iterdir())
    assert len(set(training_pids)) == 2, training_pids
    assert hooked_pids == training_pids, "init_hook must run exactly once in each worker process that trains"


SHIPPED_MODULE = """
import os
from pathlib import Path

(Path(os.environ["SHIPPED_MARKS"]) / f"imported-{os.getpid()}").touch()
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["working_dir", "py_modules"])
def test_runtime_env_ships_code_the_driver_does_not_have_to_the_workers(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package that exists only in the shipped folder imports on every worker of a local Ray (here, in init_hook),
    zipped and uploaded once for all the workers: doing it per worker grows start-up with the worker count."""
    ensure_local_ray()
    uploads: list[dict] = []

    def counted_upload(runtime_env: dict) -> dict:
        uploads.append(dict(runtime_env))
        return upload_local_code(runtime_env)

    monkeypatch.setattr(_ray, "upload_local_code", counted_upload)
    name = f"raylane_shipped_{how}"
    shipped = tmp_path / "project"
    (shipped / name).mkdir(parents=True)
    (shipped / name / "__init__.py").write_text(SHIPPED_MODULE)
    marks, report_dir = tmp_path / "marks", tmp_path / "reports"
    marks.mkdir()
    report_dir.mkdir()
    runtime_env = {"working_dir": str(shipped)} if how == "working_dir" else {"py_modules": [str(shipped / name)]}
    strategy = get_strategy(
        "ddp",
        workers=2,
        runtime_env=runtime_env,
        env={"SHIPPED_MARKS": str(marks)},
        init_hook=functools.partial(importlib.import_module, name),
        idle_timeout=0,
    )
    with pytest.raises(ImportError):
        importlib.import_module(name)  # the driver itself cannot import it: only the shipped copy can
    _quiet_trainer(strategy).fit(ClassifierModel(report_dir=str(report_dir)), make_loader(8))
    training_pids = sorted(report["pid"] for report in read_reports(report_dir))
    assert sorted(int(path.name.removeprefix("imported-")) for path in marks.iterdir()) == training_pids
    assert uploads == [runtime_env], "one upload for the group of 2 workers"


VERSIONED_MODULE = """
import os
from pathlib import Path

VERSION = {version}
(Path(os.environ["SHIPPED_MARKS"]) / f"version-{{VERSION}}-{{os.getpid()}}").touch()
"""


@pytest.mark.timeout(240)
def test_idle_workers_are_not_reused_once_the_shipped_working_dir_changed(tmp_path: Path) -> None:
    """On a cluster the workers import the runtime_env's uploaded copy of the project, which never changes under them:
    a later Trainer with the same runtime_env, after an edit, must run the edited project on fresh workers, and the
    unchanged one on the idle workers."""
    ensure_local_ray()
    name = "raylane_shipped_versioned"
    shipped, marks = tmp_path / "project", tmp_path / "marks"
    (shipped / name).mkdir(parents=True)
    marks.mkdir()
    source = shipped / name / "__init__.py"
    source.write_text(VERSIONED_MODULE.format(version=1))

    def fit_pids(run: str) -> list[int]:
        strategy = get_strategy(
            "ddp",
            workers=2,
            runtime_env={"working_dir": str(shipped)},
            env={"SHIPPED_MARKS": str(marks)},
            init_hook=functools.partial(importlib.import_module, name),  # imported from the shipped copy
            idle_timeout=120,
        )
        (tmp_path / run).mkdir()
        trainer = _quiet_trainer(strategy)
        trainer.fit(ClassifierModel(report_dir=str(tmp_path / run)), make_loader(8))
        trainers.append(trainer)
        return sorted(report["pid"] for report in read_reports(tmp_path / run))

    def imported() -> set[str]:
        return {path.name for path in marks.iterdir()}

    trainers: list[pl.Trainer] = []
    first = fit_pids("first")
    assert imported() == {f"version-1-{pid}" for pid in first}
    assert fit_pids("unchanged") == first, "the project did not change: the idle workers train the next Trainer"

    source.write_text(VERSIONED_MODULE.format(version=22))
    edited = fit_pids("edited")
    assert not set(edited) & set(first), "fresh workers"
    assert imported() - {f"version-1-{pid}" for pid in first} == {f"version-22-{pid}" for pid in edited}
    trainers[-1].strategy.release_workers()  # type: ignore[attr-defined]
    assert_released()
