"""The backend's decisions that need neither Ray nor Horovod: options, timeouts, environment, cross-node ranks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raylane import ConfigurationError, LaunchOptions, WorkerContext
from raylane.topology import DeviceAssignment, Ranks, WorkerPlacement, assign_ranks
from raylane_horovod.settings import OptimizerSettings, StallTimeouts, cross_ranks, horovod_env


def test_defaults_average_like_ddp() -> None:
    assert OptimizerSettings.from_options({}) == OptimizerSettings("none", "average", 1.0, False)


def test_options_are_case_insensitive() -> None:
    settings = OptimizerSettings.from_options({"compression": "FP16", "op": "Sum"})
    assert (settings.compression, settings.op) == ("fp16", "sum")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compression": "zstd"}, "'none', 'fp16'"),
        ({"compression": None}, "compression"),
        ({"op": "adasum"}, "'average', 'sum'"),
        ({"gradient_predivide_factor": 0}, "above 0"),
        ({"gradient_predivide_factor": True}, "gradient_predivide_factor"),
        ({"gradient_predivide_factor": 2.0, "op": "sum"}, "only applies to op='average'"),
        ({"sparse_as_dense": "yes"}, "sparse_as_dense"),
    ],
)
def test_bad_options_name_the_problem(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        OptimizerSettings.from_options(options)


@given(st.floats(min_value=0.01, max_value=100_000, allow_nan=False))
def test_a_stall_fails_within_the_collective_timeout(budget: float) -> None:
    timeouts = StallTimeouts.within(budget)
    assert timeouts.check_s >= 1
    assert timeouts.shutdown_s >= timeouts.check_s, "Horovod ignores a shutdown time below the check interval"
    # A stalled cached tensor is evicted after one check, times out, and is caught by the next check.
    assert timeouts.shutdown_s + 2 * timeouts.check_s <= max(budget, 3)
    assert timeouts.gloo_s >= 30


def test_long_timeouts_keep_horovods_warning_interval() -> None:
    assert StallTimeouts.within(1800) == StallTimeouts(check_s=60, shutdown_s=1680, gloo_s=1800)


def make_context(collective_timeout: float = 1800.0) -> WorkerContext:
    placements = [WorkerPlacement("node-a", "10.0.0.1")] * 2 + [WorkerPlacement("node-b", "10.0.0.2")]
    ranks = assign_ranks(placements)
    return WorkerContext(
        backend="horovod",
        options=LaunchOptions(workers=3, collective_timeout=collective_timeout),
        placement=placements[1],
        ranks=ranks[1],
        devices=DeviceAssignment("cpu"),
        master_addr="10.0.0.1",
        master_port=29501,
    )


def test_environment_points_every_worker_at_rank_zeros_store() -> None:
    env = horovod_env(make_context(collective_timeout=20))
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"
    assert env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "10.0.0.1"
    assert "HOROVOD_GLOO_RENDEZVOUS_PORT" not in env, "rank 0 publishes its store's port on the worker"
    assert (env["HOROVOD_RANK"], env["HOROVOD_SIZE"]) == ("1", "3")
    assert (env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"]) == ("1", "2")
    assert env["HOROVOD_HOSTNAME"] == "node-a"
    assert (env["HOROVOD_STALL_CHECK_TIME_SECONDS"], env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]) == ("2", "16")
    assert all(isinstance(value, str) for value in env.values())


@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5))
def test_cross_ranks_number_each_local_rank_across_nodes(workers_per_node: list[int]) -> None:
    placements = [
        WorkerPlacement(f"node-{node}", f"10.0.0.{node}")
        for node, count in enumerate(workers_per_node)
        for _ in range(count)
    ]
    ranks: list[Ranks] = assign_ranks(placements)
    layout = {r.global_rank: (r.node_rank, r.local_rank) for r in ranks}
    for local_rank in range(max(workers_per_node)):
        members = [r.global_rank for r in ranks if r.local_rank == local_rank]
        crossed = sorted(cross_ranks(layout, rank) for rank in members)
        assert crossed == [(index, len(members)) for index in range(len(members))]
