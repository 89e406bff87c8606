"""A later Trainer of the same driver trains on an earlier Trainer's idle warm workers, and nothing leaks across.

Reuse is what makes a re-run notebook cell or a script that fits with one Trainer and tests with another start in
well under a second; it is only safe when the run on reused workers is the run fresh workers would have made.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import ray
import torch

from raylane import get_strategy, release_idle_workers
from raylane.testing import QUIET, ClassifierModel, assert_released, ensure_local_ray, make_loader, validation_loader
from raylane.testing.equivalence import weights_of
from raylane.testing.ray_state import live_raylane_actors, release_dropped_trainers_workers
from tests.conftest import read_reports

pytestmark = pytest.mark.timeout(300)


class LeavesStateBehind(ClassifierModel):
    """Changes process-wide state in its first training step, as careless user code does."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            os.environ["RAYLANE_TEST_LEFTOVER"] = "set by an earlier run"
            torch.set_num_threads(3)
        return super().training_step(batch, batch_idx)


class ReportsProcessState(ClassifierModel):
    def on_train_start(self) -> None:
        super().on_train_start()
        path = Path(self.hparams.report_dir) / f"state-rank{self.global_rank}.txt"
        path.write_text(f"{os.environ.get('RAYLANE_TEST_LEFTOVER')}|{torch.get_num_threads()}")


EDITED_MODULE = "raylane_test_edited_model"
EDITED_HELPER = "raylane_test_edited_helper"
EDITED_SOURCE = """
import re
from pathlib import Path

from raylane.testing import ClassifierModel

VERSION = 1


class EditedModel(ClassifierModel):
    \"\"\"Logs this file's version and a helper's (imported as it runs); rank 0 edits this file mid-fit if asked.\"\"\"

    def __init__(self, edit_to=None, **kwargs):
        super().__init__(**kwargs)
        self.edit_to = edit_to

    def training_step(self, batch, batch_idx):
        if self.edit_to is not None and self.global_rank == 0 and batch_idx == 0:
            source = Path(__file__)
            source.write_text(re.sub(r"^VERSION = .*$", f"VERSION = {self.edit_to}", source.read_text(), flags=re.M))
        self._log_versions()
        return super().training_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._log_versions()
        super().test_step(batch, batch_idx)

    def _log_versions(self):
        from raylane_test_edited_helper import VERSION as HELPER_VERSION

        self.log("code_version", float(VERSION))
        self.log("helper_version", float(HELPER_VERSION))
"""


@pytest.fixture(autouse=True)
def _ray() -> None:
    ensure_local_ray()
    release_dropped_trainers_workers()  # every test here starts on fresh workers


def trainer(root: Path, **options: Any) -> pl.Trainer:
    strategy = get_strategy("ddp", **{"workers": 2, "idle_timeout": 120, **options})
    return pl.Trainer(strategy=strategy, max_epochs=1, default_root_dir=str(root), **QUIET)


def fit_pids(model: ClassifierModel, root: Path, **options: Any) -> tuple[pl.Trainer, list[int]]:
    fitted = trainer(root, **options)
    fitted.fit(model, make_loader(8), validation_loader())
    return fitted, [report["pid"] for report in read_reports(Path(model.hparams.report_dir))]


def test_a_later_trainer_runs_on_the_idle_workers_with_the_results_of_fresh_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial = ClassifierModel().state_dict()
    runs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        model = ClassifierModel(report_dir=str(tmp_path / name))
        model.load_state_dict(initial)
        fitted, pids = fit_pids(model, tmp_path / name)
        runs.append((fitted, pids, weights_of(model)))
    (first, first_pids, first_weights), (second, second_pids, second_weights) = runs
    assert second_pids == first_pids, "the second Trainer trains on the first one's idle workers"
    for name, value in first_weights.items():
        torch.testing.assert_close(second_weights[name], value, atol=0, rtol=0)
    second.strategy.release_workers()  # type: ignore[attr-defined]
    assert_released()  # with the first Trainer still alive: it gave its workers up
    del first


def fit_in_a_function(model: ClassifierModel, root: Path, **options: Any) -> list[int]:
    """A loop over settings that builds each Trainer in a function: the Trainer is dropped when it returns."""
    return fit_pids(model, root, **options)[1]


def test_a_trainer_the_collector_freed_leaves_its_idle_workers_to_the_next_one(tmp_path: Path) -> None:
    """Python frees a dropped Trainer when its collector runs (Lightning's objects form cycles): maybe before the next
    Trainer starts, maybe after. Either way the next Trainer trains on its idle workers."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first_pids = fit_in_a_function(ClassifierModel(report_dir=str(tmp_path / "a")), tmp_path / "a")
    gc.collect()  # the first Trainer is freed before the next one is built
    assert len(live_raylane_actors()) == 2, "its idle workers wait for the next Trainer"
    second, second_pids = fit_pids(ClassifierModel(report_dir=str(tmp_path / "b")), tmp_path / "b")
    assert second_pids == first_pids, "the next Trainer trains on them"
    release_idle_workers()  # the second Trainer's, alive and idle
    assert_released()
    del second


def test_a_dropped_trainers_idle_workers_leave_after_their_idle_timeout_for_waiting_work_or_at_once_if_opted_out(
    tmp_path: Path,
) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    fit_in_a_function(ClassifierModel(report_dir=str(tmp_path / "c")), tmp_path / "c", reuse_workers=False)
    gc.collect()
    assert_released(timeout_s=5)  # no Trainer may take them (idle_timeout is 120 s): they stop with their Trainer
    fit_in_a_function(ClassifierModel(report_dir=str(tmp_path / "a")), tmp_path / "a", idle_timeout=3)
    gc.collect()
    assert_released(timeout_s=30)  # the rest of its 3 s
    fit_in_a_function(ClassifierModel(report_dir=str(tmp_path / "b")), tmp_path / "b", idle_timeout=600)
    gc.collect()
    everything = ray.remote(num_cpus=ray.cluster_resources()["CPU"])(lambda: "ran")
    assert ray.get(everything.remote(), timeout=60) == "ran", "the kept workers gave their CPUs back"
    assert_released()


def test_a_trainer_dropped_before_its_first_entry_point_leaves_its_early_workers_to_the_next(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A notebook cell that builds the Trainer, run again before the cell that fits: the first Trainer started its
    workers when it was built, and is freed whenever the collector runs. The next Trainer trains on those workers."""
    monkeypatch.setenv("RAYLANE_EARLY_START", "1")  # under pytest, workers start at the first entry point otherwise
    first = trainer(tmp_path)
    assert first.strategy.launcher.early_workers_ready(timeout_s=120)  # type: ignore[attr-defined]
    early = set(live_raylane_actors())
    assert len(early) == 2
    del first
    gc.collect()
    assert set(live_raylane_actors()) == early, "they wait for the next Trainer"
    second = trainer(tmp_path)
    second.fit(ClassifierModel(), make_loader(8), validation_loader())
    assert set(live_raylane_actors()) == early, "the next Trainer trained on them and started none of its own"
    release_idle_workers()
    assert_released()


def test_what_an_earlier_run_changed_in_the_process_does_not_reach_the_next(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, first_pids = fit_pids(LeavesStateBehind(report_dir=str(tmp_path / "a")), tmp_path / "a")
    second, second_pids = fit_pids(ReportsProcessState(report_dir=str(tmp_path / "b")), tmp_path / "b")
    assert second_pids == first_pids
    states = [path.read_text().split("|") for path in sorted((tmp_path / "b").glob("state-rank*.txt"))]
    assert len(states) == 2, "both ranks reported"
    assert [leftover for leftover, _ in states] == ["None", "None"], "the environment variable it set is gone"
    assert "3" not in [threads for _, threads in states], "torch's thread count is the worker's own again"
    second.strategy.release_workers()  # type: ignore[attr-defined]
    assert_released()
    del first


def test_workers_that_imported_code_edited_since_are_not_reused(tmp_path: Path, monkeypatch: Any) -> None:
    """A notebook's loop: train, edit the model's files (maybe while it trains), reload them, run again. The idle
    workers run the old files; a later Trainer, and a Trainer's next entry point, must run the new ones, as fresh
    workers would. Each edit changes the file's size, as real edits do."""
    monkeypatch.syspath_prepend(str(tmp_path))
    model_file, helper_file = tmp_path / f"{EDITED_MODULE}.py", tmp_path / f"{EDITED_HELPER}.py"
    model_file.write_text(EDITED_SOURCE)
    helper_file.write_text("VERSION = 1\n")

    def reloaded() -> Any:
        importlib.invalidate_caches()
        loaded = sys.modules.get(EDITED_MODULE)
        return importlib.reload(loaded) if loaded is not None else importlib.import_module(EDITED_MODULE)

    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
        # Rank 0 edits the model's file while the first fit runs: what the workers imported is still the old one.
        first, first_pids = fit_pids(reloaded().EditedModel(edit_to=22, report_dir=str(tmp_path / "a")), tmp_path / "a")
        assert float(first.callback_metrics["code_version"]) == 1

        model = reloaded().EditedModel(report_dir=str(tmp_path / "b"))
        second, second_pids = fit_pids(model, tmp_path / "b")
        assert float(second.callback_metrics["code_version"]) == 22, "a later Trainer trains the edited file"
        assert not set(second_pids) & set(first_pids), "on fresh workers"

        # A module the run imported on its way (not named by the model), edited before the same Trainer's next entry
        # point.
        helper_file.write_text("VERSION = 333\n")
        (tested,) = second.test(model, make_loader(8))
        assert tested["helper_version"] == 333, "the Trainer's next entry point runs the edited helper"
        assert not {report["pid"] for report in read_reports(tmp_path / "b", "test")} & set(second_pids)
        second.strategy.release_workers()  # type: ignore[attr-defined]
        assert_released()
        del first
    finally:
        for name in (EDITED_MODULE, EDITED_HELPER):
            sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "options",
    [{"cpus_per_worker": 0.5}, {"reuse_workers": False}],
    ids=["other-resources", "opted-out"],
)
def test_workers_of_another_shape_or_an_opt_out_are_not_reused_and_do_not_linger(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, first_pids = fit_pids(ClassifierModel(report_dir=str(tmp_path / "a")), tmp_path / "a")
    second, second_pids = fit_pids(ClassifierModel(report_dir=str(tmp_path / "b")), tmp_path / "b", **options)
    assert not set(second_pids) & set(first_pids), "fresh workers"
    second.strategy.release_workers()  # type: ignore[attr-defined]
    assert_released()  # with the first Trainer still alive: its idle workers made room for the second's
    del first


def test_idle_workers_that_stopped_answering_are_stopped_not_handed_over_and_block_nothing_meanwhile(
    tmp_path: Path,
) -> None:
    """A later Trainer pings the idle workers it would reuse; one frozen worker makes that ping wait its full timeout.
    Meanwhile the earlier Trainer (its next entry point, its idle watch, ``release_workers``) must not wait for it;
    and workers that do not answer are stopped, not handed over."""
    (tmp_path / "a").mkdir()
    first, first_pids = fit_pids(ClassifierModel(report_dir=str(tmp_path / "a")), tmp_path / "a")
    launcher = first.strategy.launcher  # type: ignore[attr-defined]
    os.kill(first_pids[1], signal.SIGSTOP)
    try:
        handed_over: list[Any] = []
        options = first.strategy.launch_options  # type: ignore[attr-defined]
        # What a later Trainer's fit does first (RayLauncher._warm_group), on a thread so this one can watch.
        checking = threading.Thread(target=lambda: handed_over.append(launcher._hand_over_if_idle("ddp", options)))
        checking.start()
        deadline = time.monotonic() + 60
        while launcher._group is not None and checking.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # until the later Trainer has claimed the group, or given up on it
        first.strategy.release_workers()  # type: ignore[attr-defined]
        assert checking.is_alive(), "the earlier Trainer waited for the ping of its frozen worker"
        checking.join(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # stopped already, as it should be
            os.kill(first_pids[1], signal.SIGCONT)
    assert handed_over == [None], "a group with a frozen worker is not reused"
    assert_released()
    del first
