"""The driver's side of failures and repeated use: Ctrl-C, many fits in one process, trainers in parallel threads."""

from __future__ import annotations

import gc
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import ray

from raylane import WorkerError, get_strategy
from raylane.testing import ClassifierModel, assert_released, ensure_local_ray, make_loader, quiet_trainer
from raylane.testing.cluster import local_cluster
from raylane.testing.ray_state import listening_tcp_ports, live_raylane_actors, live_raylane_placement_groups
from tests.conftest import read_reports


def _trainer(root: Path, **flags: object) -> pl.Trainer:
    return quiet_trainer(
        strategy=get_strategy("ddp", workers=2),
        default_root_dir=str(root),
        **{"max_epochs": 1, "enable_checkpointing": False, **flags},
    )


@pytest.fixture
def shared_cluster() -> Iterator[str]:
    """A Ray cluster that outlives the driver under test, so leftovers would be visible."""
    with local_cluster(head_cpus=4) as cluster:
        yield cluster.address


@pytest.mark.timeout(330)
def test_ctrl_c_on_the_driver_stops_workers(tmp_path: Path, shared_cluster: str) -> None:
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import faulthandler, signal
            import pytorch_lightning as pl, ray
            from raylane import get_strategy
            faulthandler.register(signal.SIGUSR1)  # the test asks for every thread's stack if the driver stays
            # As in a terminal, whatever the test runner's parent ignores (a shell's background job ignores SIGINT).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            from raylane.testing import ClassifierModel, make_loader

            class Slow(ClassifierModel):
                def training_step(self, batch, batch_idx):
                    if batch_idx == 0:
                        print("TRAINING", flush=True)
                    import time; time.sleep(0.5)
                    return super().training_step(batch, batch_idx)

            ray.init(address={shared_cluster!r})
            trainer = pl.Trainer(max_epochs=100, strategy=get_strategy("ddp", workers=2), logger=False,
                                 enable_progress_bar=False, enable_checkpointing=False)
            trainer.fit(Slow(), make_loader(8))
            """
        )
    )
    driver = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    assert driver.stdout is not None
    seen = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:  # the worker's print reaches the driver's stdout through Ray's log relay
        seen.append(driver.stdout.readline())
        if "TRAINING" in seen[-1] or not seen[-1]:
            break
    assert live_raylane_actors(), "the workers should be running now:\n" + "".join(seen)
    driver.send_signal(signal.SIGINT)
    try:
        assert driver.wait(timeout=120) != 0
    except subprocess.TimeoutExpired:
        driver.send_signal(signal.SIGUSR1)
        time.sleep(2)
        driver.kill()
        pytest.fail("the driver did not exit after Ctrl-C; its output and stacks:\n" + driver.stdout.read()[-8000:])
    assert_released(timeout_s=30)


def _fit_then_test(root: Path, release: bool) -> tuple[int, frozenset[int]]:
    """One round of the leak check: a fit and a test, then the workers stopped, or left idle for the next round's
    Trainer (this frame, and the Trainer, go when it returns). Rank 0's rendezvous port and the workers' pids."""
    trainer = _trainer(root)
    model = ClassifierModel(report_dir=str(root), report_env=("MASTER_PORT",))
    trainer.fit(model, make_loader(8))
    reports = read_reports(root)
    trainer.test(model, make_loader(8))
    if release:
        trainer.strategy.release_workers()
    return int(reports[0]["env"]["MASTER_PORT"]), frozenset(report["pid"] for report in reports)


@pytest.mark.timeout(600)  # 20 entry points: about 60 s on an idle 2-core machine
def test_repeated_fit_and_test_leave_nothing_behind(tmp_path: Path) -> None:
    ensure_local_ray()
    peak_rss_kib, open_files, rendezvous_ports, worker_pids = [], [], set(), []
    for round_ in range(10):  # 20 entry points in all
        # Both ends of a run, in turn: a group stopped, and a dropped Trainer's idle workers taken by the next one.
        port, pids = _fit_then_test(tmp_path, release=bool(round_ % 2))
        rendezvous_ports.add(port)
        worker_pids.append(pids)
        gc.collect()  # the dropped Trainer hands its workers over
        peak_rss_kib.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        open_files.append(len(os.listdir("/proc/self/fd")))
    assert_released()
    assert not live_raylane_placement_groups()
    # No rank's rendezvous store outlives its run.
    assert not rendezvous_ports & listening_tcp_ports(), (rendezvous_ports, listening_tcp_ports())
    # The driver's memory and open files (sockets included) settle after the first rounds instead of growing.
    assert peak_rss_kib[-1] - peak_rss_kib[3] < 0.1 * peak_rss_kib[3], peak_rss_kib
    assert open_files[-1] <= open_files[3] + 2, open_files
    assert worker_pids[0::2] == worker_pids[1::2], "each group served two rounds: the second on idle workers"
    assert len(set(worker_pids)) == 5 and all(len(pids) == 2 for pids in worker_pids), "a stopped group never serves"


@pytest.mark.timeout(300)
def test_trainers_in_parallel_threads_do_not_collide(tmp_path: Path) -> None:
    ensure_local_ray()
    errors: list[BaseException] = []
    models = [ClassifierModel() for _ in range(2)]
    trainers = [_trainer(tmp_path / str(index), max_epochs=2) for index in range(2)]

    def fit(index: int) -> None:
        try:
            trainers[index].fit(models[index], make_loader(8))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=fit, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors, errors
    assert all(not thread.is_alive() for thread in threads)
    for trainer in trainers:
        trainer.strategy.release_workers()  # warm for a next entry point until then
    assert_released()


@pytest.mark.timeout(120)
def test_exception_in_setup_reaches_driver(tmp_path: Path) -> None:
    class BrokenSetup(ClassifierModel):
        def setup(self, stage: str) -> None:
            if self.global_rank == 1:
                raise ValueError("bad setup on rank 1")

    ensure_local_ray()
    with pytest.raises(WorkerError, match="bad setup on rank 1") as info:
        _trainer(tmp_path).fit(BrokenSetup(), make_loader(8))
    assert info.value.rank == 1
    assert_released()


@pytest.mark.timeout(120)
def test_exception_in_a_dataloader_worker_reaches_driver(tmp_path: Path) -> None:
    ensure_local_ray()

    class Exploding(ClassifierModel):
        pass

    loader = make_loader(8, num_workers=1, collate_fn=_explode_on_rank_collate)
    with pytest.raises(WorkerError, match="collate exploded"):
        _trainer(tmp_path).fit(Exploding(), loader)
    assert_released()


def _explode_on_rank_collate(batch: list) -> object:
    raise RuntimeError(f"collate exploded in pid {os.getpid()}")


@pytest.mark.timeout(180)
def test_an_idle_trainer_never_blocks_the_next_one(tmp_path: Path) -> None:
    """The first Trainer keeps its warm workers (all the CPUs); a second one must not wait for them."""
    ensure_local_ray()
    cpus = int(ray.cluster_resources()["CPU"])
    first = quiet_trainer(
        strategy=get_strategy("ddp", workers=2, cpus_per_worker=cpus // 2, idle_timeout=60),
        max_epochs=1,
        enable_checkpointing=False,
    )
    first.fit(ClassifierModel(), make_loader(8))
    second = quiet_trainer(
        strategy=get_strategy("ddp", workers=2, cpus_per_worker=cpus // 2, resource_timeout=20),
        max_epochs=1,
        enable_checkpointing=False,
    )
    second.fit(ClassifierModel(), make_loader(8))  # would raise ResourceError after 20 s if first still held them
    first.test(ClassifierModel(), make_loader(8))  # and the first Trainer still works: it starts workers again
    first.strategy.release_workers()
    second.strategy.release_workers()
    assert_released()
