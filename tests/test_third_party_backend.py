"""A backend from outside this repository (tests/plugins/raylane-echo) is found, runs every hook, and conforms."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl

from raylane import list_backends
from raylane.testing import BackendConformance, ClassifierModel, make_loader, quiet_trainer
from raylane.testing.ray_state import ensure_local_ray


class TestEchoConformance(BackendConformance):
    backend = "echo"


class RelayingModel(ClassifierModel):
    def on_train_epoch_end(self) -> None:
        from raylane import relay

        relay.send("echo.epoch", self.current_epoch)


def _fit(tmp_path: Path, model: ClassifierModel, **options: object) -> pl.Trainer:
    from raylane import get_strategy

    ensure_local_ray()
    trainer = quiet_trainer(
        strategy=get_strategy("echo", workers=2, **options), max_epochs=3, default_root_dir=str(tmp_path)
    )
    trainer.fit(model, make_loader(8))
    return trainer


def test_echo_is_discovered_from_its_own_distribution() -> None:
    [echo] = [info for info in list_backends() if info.name == "echo"]
    assert (echo.distribution, echo.version, echo.entry_point) == ("raylane-echo", "0.0.1", "raylane_echo")


@pytest.mark.timeout(180)
def test_every_hook_of_a_third_party_backend_runs(tmp_path: Path) -> None:
    """Covers raylane_strategy_class, raylane_backend_options, raylane_worker_actor_options, raylane_worker_env,
    raylane_setup_process_group, raylane_teardown_process_group, raylane_collect_results, raylane_apply_results and
    raylane_relay_metrics in one real run."""
    trace = tmp_path / "trace"
    trace.mkdir()
    model = RelayingModel(report_dir=str(tmp_path), report_env=("ECHO_TAG", "ECHO_ACTOR_OPTION", "ECHO_DIR"))
    trainer = _fit(tmp_path, model, echo_tag="hello", env={"ECHO_DIR": str(trace)})

    from tests.conftest import read_reports

    reports = read_reports(tmp_path)
    assert [r["env"]["ECHO_TAG"] for r in reports] == ["hello", "hello"]  # backend option -> worker_env
    assert {r["env"]["ECHO_ACTOR_OPTION"] for r in reports} == {"set-by-actor-options"}  # worker_actor_options
    for rank in (0, 1):  # setup/teardown ran on every rank, with the env the driver computed for that rank
        assert (trace / f"setup-rank{rank}").read_text() == str(rank)
        assert (trace / f"teardown-rank{rank}").read_text() == str(rank)
    results = trainer.strategy.echo_results  # collect_results on rank 0 -> apply_results on the driver
    assert results["echo.rank"] == 0 and results["echo.tag"] == "hello"
    assert results["echo.pid"] == reports[0]["pid"]
    assert trainer.strategy.echo_messages == [("echo.epoch", 0), ("echo.epoch", 1), ("echo.epoch", 2)]  # relay


def test_relay_send_outside_a_worker_does_nothing() -> None:
    from raylane import relay

    assert relay.send("echo.epoch", 1) is False
