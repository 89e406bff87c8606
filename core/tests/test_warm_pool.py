"""Which Trainers the warm pool serves, and its settings. The pool itself, across real scripts on a real
``ray start --head``, is tested in tests/test_cluster_launch_modes.py."""

from __future__ import annotations

from typing import Any

import pytest

from raylane import warm_pool
from raylane.builtin import raylane_worker_actor_options
from raylane.errors import ConfigurationError
from raylane.options import LaunchOptions


def _default_actor_options(options: LaunchOptions) -> dict[str, Any]:
    return raylane_worker_actor_options(options)


def test_cpu_workers_with_the_default_actor_options_can_come_from_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(warm_pool.SWITCH_ENV, raising=False)
    options = LaunchOptions(workers=4, cpus_per_worker=2, resources_per_worker={"accelerator_slot": 1})
    assert warm_pool.why_fresh(options, _default_actor_options(options)) is None


@pytest.mark.parametrize(
    ("options", "extra_actor_options", "reason"),
    [
        (LaunchOptions(workers=2, reuse_workers=False), {}, "reuse_workers=False"),
        (LaunchOptions(workers=2, use_gpu=True), {}, "GPU"),
        (LaunchOptions(workers=2, runtime_env={"env_vars": {"A": "1"}}), {}, "runtime_env"),
        (LaunchOptions(workers=2), {"max_restarts": 3}, "max_restarts"),
    ],
    ids=["opted out", "GPU workers", "runtime_env", "a backend's own actor options"],
)
def test_workers_a_pool_worker_would_not_match_start_fresh(
    options: LaunchOptions, extra_actor_options: dict[str, Any], reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(warm_pool.SWITCH_ENV, raising=False)
    actor_options = {**_default_actor_options(options), **extra_actor_options}
    assert reason in (warm_pool.why_fresh(options, actor_options) or "")


@pytest.mark.parametrize("switch", ["0", "off", "False"])
def test_the_pool_can_be_turned_off(switch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(warm_pool.SWITCH_ENV, switch)
    options = LaunchOptions(workers=2)
    assert warm_pool.why_fresh(options, _default_actor_options(options)) == f"{warm_pool.SWITCH_ENV}=0"


@pytest.mark.parametrize("raw", ["soon", "0", "-5", "nan", "inf"])
def test_a_bad_pool_timeout_says_what_to_give(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(warm_pool.TIMEOUT_ENV, raw)
    with pytest.raises(ConfigurationError, match=rf"RAYLANE_WARM_POOL_TIMEOUT={raw!r}: give the seconds"):
        warm_pool.waiting_timeout()


def test_the_pool_timeout_defaults_and_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(warm_pool.TIMEOUT_ENV, raising=False)
    assert warm_pool.waiting_timeout() == warm_pool.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(warm_pool.TIMEOUT_ENV, "45.5")
    assert warm_pool.waiting_timeout() == 45.5
