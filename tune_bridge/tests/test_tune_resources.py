"""get_tune_resources: the trial's placement group is the driver's bundle, then the backend's worker bundles."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raylane import ConfigurationError, get_strategy
from raylane.options import PLACEMENT_STRATEGIES, LaunchOptions
from raylane.registry import backend_host
from raylane_tune import get_tune_resources
from raylane_tune.resources import trial_resources

amounts = st.sampled_from([0, 0.25, 0.5, 1, 2, 3])
custom = st.dictionaries(st.sampled_from(["accelerator_x", "big_node", "ssd"]), amounts, max_size=2)


@st.composite
def launch_options(draw: st.DrawFn) -> dict[str, Any]:
    use_gpu = draw(st.booleans())
    options: dict[str, Any] = {
        "workers": draw(st.integers(1, 8)),
        "cpus_per_worker": draw(amounts),
        "use_gpu": use_gpu,
        "resources_per_worker": draw(custom),
        "placement_strategy": draw(st.sampled_from(PLACEMENT_STRATEGIES)),
    }
    if use_gpu:
        options["gpus_per_worker"] = draw(st.sampled_from([None, 0.25, 0.5, 1, 2]))
    return options


def _nonzero(bundle: dict[str, float]) -> dict[str, float]:
    return {name: float(amount) for name, amount in bundle.items() if amount}


@settings(max_examples=60, deadline=None)
@given(
    options=launch_options(),
    driver=st.one_of(st.none(), st.dictionaries(st.sampled_from(["CPU", "GPU", "ssd"]), amounts, max_size=2)),
)
def test_bundles_follow_the_options(options: dict[str, Any], driver: dict[str, float] | None) -> None:
    try:
        launch = LaunchOptions(**options)
    except ConfigurationError as invalid:  # the core's rules decide; get_tune_resources must agree
        with pytest.raises(ConfigurationError, match=re.escape(str(invalid))):
            get_tune_resources("ddp", driver_resources=driver, **options)
        return
    resources = get_tune_resources("ddp", driver_resources=driver, **options)

    worker = launch.worker_resources()
    assert worker.get("CPU", 0) == options["cpus_per_worker"]
    assert (worker.get("GPU", 0) > 0) == options["use_gpu"]
    assert {name: worker[name] for name in worker if name not in ("CPU", "GPU")} == _nonzero(
        options["resources_per_worker"]
    )
    driver_bundle = _nonzero(driver or {})
    # Tune drops an empty first bundle: the trial's process then reserves nothing and runs in the first worker's bundle.
    assert resources.head_bundle_is_empty == (not driver_bundle)
    expected = ([driver_bundle] if driver_bundle else []) + [worker] * options["workers"]
    assert resources.bundles == expected
    assert resources.strategy == options["placement_strategy"]


@settings(max_examples=20, deadline=None)
@given(options=launch_options())
def test_a_strategy_brings_its_own_settings(options: dict[str, Any]) -> None:
    try:
        LaunchOptions(**options)
    except ConfigurationError as invalid:  # the core's rules: no strategy either, with the same message
        with pytest.raises(ConfigurationError, match=re.escape(str(invalid))):
            get_strategy("ddp", **options)
        return
    if options["use_gpu"] and 0 < (options.get("gpus_per_worker") or 1) < 1:  # ddp's own rule: NCCL needs whole GPUs
        with pytest.raises(ConfigurationError, match="process_group_backend='gloo'"):
            get_strategy("ddp", **options)
        return
    strategy = get_strategy("ddp", **options)
    assert get_tune_resources(strategy) == get_tune_resources("ddp", **options)


def test_the_backend_decides_the_worker_bundles() -> None:
    options = LaunchOptions(workers=3, cpus_per_worker=2)
    assert backend_host("ddp").placement_bundles(options) == [{"CPU": 2.0}] * 3
    # A backend may shape its workers differently (e.g. a coordinator first); the order is kept.
    shaped = trial_resources([{"CPU": 4.0}, {"CPU": 1.0}, {"CPU": 1.0}], options, {"CPU": 0.5})
    assert shaped.bundles == [{"CPU": 0.5}, {"CPU": 4.0}, {"CPU": 1.0}, {"CPU": 1.0}]


def test_unknown_options_list_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError, match="cpus_per_worker") as info:
        get_tune_resources("ddp", workers=2, cpu_per_worker=1)
    assert "cpu_per_worker" in str(info.value)
    with pytest.raises(ConfigurationError, match="workers=N"):
        get_tune_resources("ddp")


def test_a_strategy_takes_no_further_options() -> None:
    with pytest.raises(ConfigurationError, match="brings its own options"):
        get_tune_resources(get_strategy("ddp", workers=2), cpus_per_worker=2)


# A whole number (or nothing) is ray_lightning's num_workers: see test_tune_ray_lightning_forms.py.
@pytest.mark.parametrize("thing", [2.5, object(), b"ddp"])
def test_anything_else_is_rejected(thing: object) -> None:
    with pytest.raises(ConfigurationError, match="backend name"):
        get_tune_resources(thing)  # type: ignore[arg-type]


@pytest.mark.parametrize("driver", [{"CPU": -1}, {"CPU": float("nan")}, {"cpu": 1}, {"CPU": True}, [("CPU", 1)]])
def test_invalid_driver_resources_are_rejected(driver: object) -> None:
    with pytest.raises(ConfigurationError, match="driver_resources"):
        get_tune_resources("ddp", workers=2, driver_resources=driver)  # type: ignore[arg-type]


def test_an_elastic_strategy_reserves_its_most_workers_unless_told_otherwise() -> None:
    elastic = get_strategy("ddp", workers=(1, 3), cpus_per_worker=2)
    assert get_tune_resources(elastic).bundles == [{"CPU": 2.0}] * 3
    assert get_tune_resources("ddp", workers=(1, 3), cpus_per_worker=2).bundles == [{"CPU": 2.0}] * 3
    assert get_tune_resources(elastic, reserve_workers=2).bundles == [{"CPU": 2.0}] * 2


@pytest.mark.parametrize("count", [0, 4, 2.0, True])
def test_reserve_workers_stays_inside_the_strategys_range(count: object) -> None:
    with pytest.raises(
        ConfigurationError, match=r"reserve_workers=.*from the strategy's fewest to its most workers, 1 to 3"
    ):
        get_tune_resources("ddp", workers=(1, 3), reserve_workers=count)  # type: ignore[arg-type]
