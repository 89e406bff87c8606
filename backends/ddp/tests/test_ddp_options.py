"""DDP-specific options: pass-through to DistributedDataParallel and the process-group backend choice."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.nn.parallel import DistributedDataParallel

from raylane import ConfigurationError, get_strategy
from raylane.testing import ClassifierModel, ensure_local_ray, make_loader, quiet_trainer
from raylane.testing.equivalence import assert_separate_optimizers_need_then_train_with
from raylane_ddp import process_group_backend


class ReportsDDP(ClassifierModel):
    def on_train_start(self) -> None:
        ddp = self.trainer.strategy.model
        assert isinstance(ddp, DistributedDataParallel)
        self.log("find_unused", float(ddp.find_unused_parameters), rank_zero_only=True)
        self.log("bucket_mib", ddp.bucket_bytes_cap / 2**20, rank_zero_only=True)
        self.log("static_graph", float(ddp.static_graph), rank_zero_only=True)


@pytest.mark.timeout(120)
def test_ddp_options_reach_distributed_data_parallel() -> None:
    ensure_local_ray()
    strategy = get_strategy("ddp", workers=2, find_unused_parameters=True, bucket_cap_mb=5, static_graph=True)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, enable_checkpointing=False)
    trainer.fit(ReportsDDP(), make_loader(8))
    assert trainer.callback_metrics["find_unused"] == 1.0
    assert trainer.callback_metrics["bucket_mib"] == 5.0
    assert trainer.callback_metrics["static_graph"] == 1.0
    strategy.release_workers()


@pytest.mark.timeout(180)
def test_unused_parameters_fail_naming_the_option_and_train_with_it(tmp_path: Path) -> None:
    # Lightning's own message names strategy strings that would leave raylane; the error must say raylane's way.
    ensure_local_ray()
    remedy = "get_strategy('ddp', workers=..., find_unused_parameters=True)"
    assert_separate_optimizers_need_then_train_with("ddp", tmp_path, remedy, {}, {"find_unused_parameters": True})


@pytest.mark.parametrize(
    ("requested", "uses_gpu", "expected"),
    [(None, False, "gloo"), (None, True, "nccl"), ("gloo", True, "gloo"), ("nccl", True, "nccl")],
)
def test_process_group_backend_defaults_and_choices(requested: str | None, uses_gpu: bool, expected: str) -> None:
    assert process_group_backend(requested, uses_gpu) == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"process_group_backend": "mpi"}, "nccl, gloo"),
        ({"process_group_backend": "nccl"}, "needs GPUs"),
        ({"use_gpu": True, "gpus_per_worker": 0.5}, "process_group_backend='gloo'"),
    ],
)
def test_bad_process_group_backend_fails_before_any_actor(options: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        get_strategy("ddp", workers=2, **options)


def test_a_backend_option_given_as_none_is_left_to_its_default() -> None:
    # Configuration tools (LightningCLI) pass every option in the strategy's signature, None where the user set none.
    assert get_strategy("ddp", workers=2, find_unused_parameters=None, bucket_cap_mb=None).backend_options == {}
    assert get_strategy("ddp", workers=2, bucket_cap_mb=5, static_graph=None).backend_options == {"bucket_cap_mb": 5}


def test_a_communication_hook_on_cpu_workers_warns_that_lightning_ignores_it() -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    with pytest.warns(UserWarning, match="GPU workers only"):
        get_strategy("ddp", workers=2, ddp_comm_hook=default_hooks.fp16_compress_hook)
