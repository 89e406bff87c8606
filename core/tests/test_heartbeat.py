"""How often the driver pings each worker: bounded for the driver however many workers, and always well within the
heartbeat timeout for each worker."""

from __future__ import annotations

import pytest

from raylane.heartbeat import MAX_PINGS_PER_S, PING_PERIOD_S, ping_period


@pytest.mark.parametrize("workers", [1, 2, 16, 100])
def test_up_to_a_hundred_workers_are_pinged_every_second(workers: int) -> None:
    assert ping_period(workers, timeout_s=30) == PING_PERIOD_S


@pytest.mark.parametrize("workers", [256, 1024, 4096])
@pytest.mark.parametrize("timeout_s", [30.0, 120.0, 1800.0])
def test_many_workers_are_pinged_less_often_but_well_within_the_timeout(workers: int, timeout_s: float) -> None:
    period = ping_period(workers, timeout_s)
    assert period <= timeout_s / 3, "a live worker's last answer is never near the timeout"
    assert workers / period <= max(MAX_PINGS_PER_S, 3 * workers / timeout_s), "the driver's rate is capped"
    assert workers / period < workers / PING_PERIOD_S, "fewer pings a second than one per worker"


def test_a_short_timeout_never_makes_pings_more_frequent_than_once_a_second() -> None:
    assert ping_period(2, timeout_s=1.5) == PING_PERIOD_S
