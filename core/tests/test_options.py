"""Every bad option fails before anything touches Ray, with a message naming the option; good ones size the workers."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from ray.util.placement_group import validate_placement_group

from raylane import ConfigurationError
from raylane.options import LAUNCH_OPTION_NAMES, PLACEMENT_STRATEGIES, LaunchOptions, split_options

property_test = settings(max_examples=100, deadline=None)
BACKEND_OPTIONS = {"find_unused_parameters": "DDP: allow parameters that get no gradient in a step"}

INVALID = [
    # (options, the name the message must contain)
    ({"workers": 0}, "workers"),
    ({"workers": -2}, "workers"),
    ({"workers": 2.0}, "workers"),
    ({"workers": "2"}, "workers"),
    ({"workers": True}, "workers"),
    ({"workers": 2, "cpus_per_worker": -1}, "cpus_per_worker"),
    ({"workers": 2, "cpus_per_worker": math.nan}, "cpus_per_worker"),
    ({"workers": 2, "cpus_per_worker": math.inf}, "cpus_per_worker"),
    ({"workers": 2, "cpus_per_worker": "1"}, "cpus_per_worker"),
    ({"workers": 2, "cpus_per_worker": True}, "cpus_per_worker"),
    ({"workers": 2, "use_gpu": "yes"}, "use_gpu"),
    ({"workers": 2, "use_gpu": 1}, "use_gpu"),
    ({"workers": 2, "gpus_per_worker": 1}, "gpus_per_worker"),
    ({"workers": 2, "gpus_per_worker": 0.5}, "gpus_per_worker"),
    ({"workers": 2, "use_gpu": True, "gpus_per_worker": 1.5}, "gpus_per_worker"),
    ({"workers": 2, "use_gpu": True, "gpus_per_worker": -1}, "gpus_per_worker"),
    ({"workers": 2, "use_gpu": True, "gpus_per_worker": math.nan}, "gpus_per_worker"),
    ({"workers": 2, "resources_per_worker": {"CPU": 2}}, "resources_per_worker"),
    ({"workers": 2, "resources_per_worker": {"GPU": 1}}, "resources_per_worker"),
    ({"workers": 2, "resources_per_worker": {"memory": 1e9}}, "resources_per_worker"),
    ({"workers": 2, "resources_per_worker": {"accelerator": -1}}, "resources_per_worker['accelerator']"),
    ({"workers": 2, "resources_per_worker": {"accelerator": math.inf}}, "resources_per_worker['accelerator']"),
    ({"workers": 2, "placement_strategy": "pack"}, "placement_strategy"),
    ({"workers": 2, "placement_strategy": "SPREAD_EVENLY"}, "placement_strategy"),
    ({"workers": 2, "env": {"SEED": 1}}, "env"),
    ({"workers": 2, "env": {1: "x"}}, "env"),
    ({"workers": 2, "init_hook": "setup_logging"}, "init_hook"),
    ({"workers": 2, "runtime_env": ["pip"]}, "runtime_env"),
    ({"workers": 2, "resource_timeout": 0}, "resource_timeout"),
    ({"workers": 2, "resource_timeout": -5}, "resource_timeout"),
    ({"workers": 2, "collective_timeout": 0}, "collective_timeout"),
    ({"workers": 2, "collective_timeout": math.nan}, "collective_timeout"),
    ({"workers": 2, "max_failures": -1}, "max_failures"),
    ({"workers": 2, "max_failures": 1.0}, "max_failures"),
    ({"workers": 2, "max_failures": True}, "max_failures"),
    ({"workers": 2, "grow_after_s": -1}, "grow_after_s"),
    ({"workers": 2, "grow_after_s": math.nan}, "grow_after_s"),
    ({"workers": 2, "min_workers": 3}, "min_workers"),
    ({"workers": 2, "min_workers": 0}, "min_workers"),
    ({"workers": 2, "min_workers": 1.0}, "min_workers"),
]

# workers=(min, max) that is not a range, each with the part of the message that says what to write.
INVALID_RANGES = [
    ((0, 2), "needs a whole number (int) >= 1 as min"),
    ((3, 2), "write the smaller first, workers=(2, 3)"),
    ((2.5, 4), "needs a whole number (int) >= 1 as min, got 2.5"),
    ((2, 4.0), "as max, got 4.0"),
    ((1, 2, 3), "a range is two whole numbers, workers=(min, max)"),
    ((2,), "a range is two whole numbers, workers=(min, max)"),
    ((True, 2), "as min, got True"),
    (("1", "2"), "as min, got '1'"),
]


@pytest.mark.parametrize(("options", "name"), INVALID, ids=[f"{name}={o!r}" for o, name in INVALID])
def test_invalid_option_is_a_configuration_error_naming_it(options: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(name)):
        split_options(options, BACKEND_OPTIONS, "ddp")


@pytest.mark.parametrize(("workers", "says"), INVALID_RANGES, ids=[repr(w) for w, _ in INVALID_RANGES])
def test_a_bad_worker_range_says_what_to_write(workers: Any, says: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        split_options({"workers": workers}, BACKEND_OPTIONS, "ddp")


def test_a_range_given_twice_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("or workers=max with min_workers=min")):
        LaunchOptions(workers=(1, 4), min_workers=2)


@pytest.mark.parametrize(
    ("given", "most", "fewest", "elastic"),
    [
        ({"workers": (2, 8)}, 8, 2, True),
        ({"workers": [2, 8]}, 8, 2, True),  # YAML and JSON configuration files give lists
        ({"workers": 8, "min_workers": 2}, 8, 2, True),
        ({"workers": (3, 3)}, 3, 3, False),  # (n, n) behaves like n
        ({"workers": 3}, 3, 3, False),
    ],
)
def test_a_worker_range_is_the_most_workers_and_the_fewest(
    given: dict[str, Any], most: int, fewest: int, elastic: bool
) -> None:
    options = LaunchOptions(**given)
    assert (options.workers, options.min_workers, options.elastic) == (most, fewest, elastic)
    assert options == LaunchOptions(workers=most, min_workers=fewest), "one meaning, however it was written"


def test_an_elastic_run_sized_to_a_count_is_a_fixed_run_of_that_count() -> None:
    options = LaunchOptions(workers=(2, 8), cpus_per_worker=2, grow_after_s=5)
    sized = options.sized(5)
    assert (sized.workers, sized.min_workers, sized.elastic) == (5, 5, False)
    assert (sized.cpus_per_worker, sized.grow_after_s) == (2, 5)


def test_configuration_errors_are_value_errors() -> None:
    # Code written before raylane, catching ValueError around strategy construction, keeps working.
    with pytest.raises(ValueError, match="workers"):
        LaunchOptions(workers=0)


def test_unknown_options_are_named_with_every_valid_option() -> None:
    with pytest.raises(ConfigurationError) as raised:
        split_options({"workers": 2, "wrokers": 2, "num_gpus": 1}, BACKEND_OPTIONS, "ddp")

    message = str(raised.value)
    assert "Unknown option(s) for backend 'ddp': num_gpus, wrokers." in message
    valid = message.split("Valid options are: ", 1)[1]
    assert set(re.findall(r"\w+", valid)) == {*LAUNCH_OPTION_NAMES, *BACKEND_OPTIONS}


def test_workers_is_required() -> None:
    with pytest.raises(ConfigurationError, match=r"needs workers=N"):
        split_options({"cpus_per_worker": 2}, BACKEND_OPTIONS, "ddp")


def test_split_options_separates_shared_and_backend_options() -> None:
    launch, backend = split_options(
        {"workers": 3, "cpus_per_worker": 2, "find_unused_parameters": True}, BACKEND_OPTIONS, "ddp"
    )

    assert (launch.workers, launch.cpus_per_worker) == (3, 2)
    assert backend == {"find_unused_parameters": True}


def test_valid_edge_values_are_accepted() -> None:
    options = LaunchOptions(
        workers=1,
        use_gpu=True,
        gpus_per_worker=2.0,
        resources_per_worker={"accelerator": 0},
        placement_strategy="STRICT_SPREAD",
        env={"SEED": "1"},
        init_hook=lambda: None,
        runtime_env={"pip": ["numpy"]},
        resource_timeout=0.5,
    )

    assert options.worker_resources() == {"CPU": 1.0, "GPU": 2.0}


@pytest.mark.parametrize(
    ("options", "bundle"),
    [
        ({}, {"CPU": 1.0}),
        ({"cpus_per_worker": 4}, {"CPU": 4.0}),
        ({"use_gpu": True}, {"CPU": 1.0, "GPU": 1.0}),
        ({"use_gpu": True, "gpus_per_worker": 0.25}, {"CPU": 1.0, "GPU": 0.25}),
        ({"use_gpu": True, "gpus_per_worker": 2}, {"CPU": 1.0, "GPU": 2.0}),
        (
            {"resources_per_worker": {"TPU": 4, "accelerator_type:A100": 0.01}},
            {"CPU": 1.0, "TPU": 4.0, "accelerator_type:A100": 0.01},
        ),
        ({"cpus_per_worker": 0, "use_gpu": True}, {"GPU": 1.0}),
    ],
)
def test_worker_resources_are_one_bundle_in_rays_names(options: dict[str, Any], bundle: dict[str, float]) -> None:
    assert LaunchOptions(workers=2, **options).worker_resources() == bundle


amounts = st.one_of(st.just(0), st.integers(1, 16), st.floats(0.01, 64, allow_nan=False))
gpu_amounts = st.one_of(st.none(), st.floats(0.01, 1.0), st.integers(1, 8), st.integers(1, 8).map(float))
custom_resources = st.dictionaries(st.sampled_from(["TPU", "accelerator", "license", "node:head"]), amounts, max_size=3)


@property_test
@given(cpus=amounts, use_gpu=st.booleans(), gpus=gpu_amounts, resources=custom_resources)
def test_worker_resources_hold_exactly_the_positive_amounts(
    cpus: float, use_gpu: bool, gpus: float | None, resources: dict[str, float]
) -> None:
    assume(cpus > 0 or use_gpu or any(resources.values()))  # a worker reserving nothing is no valid launch
    options = LaunchOptions(
        workers=2,
        cpus_per_worker=cpus,
        use_gpu=use_gpu,
        gpus_per_worker=gpus if use_gpu else None,
        resources_per_worker=resources,
    )

    expected = {"CPU": float(cpus), **{name: float(amount) for name, amount in resources.items()}}
    if use_gpu:
        expected["GPU"] = 1.0 if gpus is None else float(gpus)
    assert options.worker_resources() == {name: amount for name, amount in expected.items() if amount > 0}
    assert all(isinstance(amount, float) for amount in options.worker_resources().values())


@property_test
@given(
    cpus=amounts,
    use_gpu=st.booleans(),
    gpus=gpu_amounts,
    resources=custom_resources,
    strategy=st.sampled_from(PLACEMENT_STRATEGIES),
)
def test_every_valid_option_set_gives_a_placement_group_ray_accepts(
    cpus: float, use_gpu: bool, gpus: float | None, resources: dict[str, float], strategy: str
) -> None:
    arguments = {
        "workers": 2,
        "cpus_per_worker": cpus,
        "use_gpu": use_gpu,
        "gpus_per_worker": gpus if use_gpu else None,
        "resources_per_worker": resources,
        "placement_strategy": strategy,
    }
    # In this space the one invalid set is a worker that reserves nothing, which Ray cannot place.
    if cpus == 0 and not use_gpu and not any(resources.values()):
        with pytest.raises(ConfigurationError, match=r"reserves nothing.*give cpus_per_worker > 0"):
            LaunchOptions(**arguments)
        return
    options = LaunchOptions(**arguments)
    # Ray's own validation of placement_group(...) arguments; it needs no running Ray.
    validate_placement_group([options.worker_resources()] * options.workers, strategy=options.placement_strategy)


def test_use_gpu_reserves_a_gpu_for_every_worker() -> None:
    # A worker that asked for a GPU but reserved none would find no device at start-up.
    try:
        options = LaunchOptions(workers=2, use_gpu=True, gpus_per_worker=0)
    except ConfigurationError as err:
        assert "gpus_per_worker" in str(err)
    else:
        assert options.worker_resources().get("GPU", 0) > 0


def test_idle_workers_serve_a_later_trainer_only_when_they_look_the_same() -> None:
    base = LaunchOptions(workers=2, cpus_per_worker=1, idle_timeout=5, env={"A": "1"})
    per_entry_point = LaunchOptions(
        workers=2, heartbeat_timeout=3, collective_timeout=9, env={"B": "2"}, max_failures=1
    )
    assert base.same_workers(per_entry_point), "timeouts, env and restarts apply per entry point"
    for other in (
        LaunchOptions(workers=3),
        LaunchOptions(workers=2, cpus_per_worker=2),
        LaunchOptions(workers=2, resources_per_worker={"accelerator": 1}),
        LaunchOptions(workers=2, placement_strategy="SPREAD"),
        LaunchOptions(workers=2, runtime_env={"env_vars": {"X": "1"}}),
        LaunchOptions(workers=2, reuse_workers=False),
    ):
        assert not base.same_workers(other) and not other.same_workers(base), other
    with pytest.raises(ConfigurationError, match="reuse_workers"):
        LaunchOptions(workers=2, reuse_workers="yes")  # type: ignore[arg-type]
