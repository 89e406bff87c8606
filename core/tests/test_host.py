"""The plugin host refuses bad plugins by name; a backend's answers beat (or merge over) the core's defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from raylane import BackendLoadError, LaunchOptions, WorkerContext, hookimpl
from raylane.host import BackendHost
from raylane.placement import WorkerReservation
from raylane.topology import DeviceAssignment, Ranks, WorkerPlacement, assign_devices


class StrategyOnly:
    @hookimpl
    def raylane_strategy_class(self) -> type:
        return StrategyOnly


class MisspelledHook(StrategyOnly):
    @hookimpl
    def raylane_worker_evn(self, context: WorkerContext) -> dict[str, str]:
        return {}


class WrongArgumentName(StrategyOnly):
    @hookimpl
    def raylane_placement_bundles(self, launch_options: LaunchOptions) -> list[dict[str, float]]:
        return []


class Answering(StrategyOnly):
    """Answers every hook the core has a default for, each with fewer arguments than the spec offers."""

    @hookimpl
    def raylane_placement_bundles(self) -> list[dict[str, float]]:
        return [{"CPU": 1.0}, {"CPU": 3.0, "coordinator": 1.0}]

    @hookimpl
    def raylane_assign_devices(self, placements: Sequence[WorkerPlacement]) -> list[DeviceAssignment]:
        return [DeviceAssignment("cpu", cuda_visible_devices=str(i)) for i, _ in enumerate(placements)]

    @hookimpl
    def raylane_worker_env(self) -> dict[str, str]:
        return {"RANK": "from-backend", "BACKEND_ONLY": "b", "SHARED": "backend"}

    @hookimpl
    def raylane_worker_actor_options(self, bundle_index: int) -> dict[str, Any]:
        return {"max_concurrency": 8, "max_restarts": bundle_index}

    @hookimpl
    def raylane_backend_options(self) -> dict[str, str]:
        return {"answer": "the backend's own option"}


class Deferring(StrategyOnly):
    """Returns None from firstresult hooks: the core's default answers instead."""

    @hookimpl
    def raylane_placement_bundles(self, options: LaunchOptions) -> None:
        return None

    @hookimpl
    def raylane_assign_devices(self, placements: Sequence[WorkerPlacement], options: LaunchOptions) -> None:
        return None


class Extension:
    @hookimpl
    def raylane_worker_env(self) -> dict[str, str]:
        return {"SHARED": "extension", "RANK": "from-extension", "EXTENSION_ONLY": "e"}


class JoiningAnExistingGroup:
    """An extension placing the workers in a placement group someone else owns (a Ray Tune trial's)."""

    group = object()

    @hookimpl
    def raylane_reserve_workers(self, bundles: list[dict[str, float]]) -> WorkerReservation:
        return WorkerReservation(self.group, tuple(reversed(range(len(bundles)))), owned=False)  # type: ignore[arg-type]


class NoStrategy:
    @hookimpl
    def raylane_backend_options(self) -> dict[str, str]:
        return {}


OPTIONS = LaunchOptions(workers=2, cpus_per_worker=2, env={"USER_VAR": "from-env-option", "SHARED": "user"})
PLACEMENTS = [WorkerPlacement("node-a", "10.0.0.1"), WorkerPlacement("node-a", "10.0.0.1")]


def context(options: LaunchOptions = OPTIONS) -> WorkerContext:
    return WorkerContext(
        backend="test",
        options=options,
        placement=PLACEMENTS[1],
        ranks=Ranks(global_rank=1, local_rank=1, node_rank=0, world_size=2, local_world_size=2, num_nodes=1),
        devices=DeviceAssignment("cpu"),
        master_addr="10.0.0.1",
        master_port=29500,
    )


@pytest.mark.parametrize(
    ("plugin", "hook"), [(MisspelledHook(), "raylane_worker_evn"), (WrongArgumentName(), "raylane_placement_bundles")]
)
def test_a_plugin_not_matching_the_specs_is_refused_by_name(plugin: object, hook: str) -> None:
    with pytest.raises(BackendLoadError) as raised:
        BackendHost("typo", plugin)

    message = str(raised.value)
    assert "Plugin 'backend:typo' does not match raylane's hook specifications" in message
    assert hook in message


def test_a_bad_extension_is_refused_by_its_name() -> None:
    with pytest.raises(BackendLoadError, match="Plugin 'raylane-extras:typo'"):
        BackendHost("good", StrategyOnly(), [("raylane-extras:typo", MisspelledHook())])


def test_the_backends_firstresult_answers_beat_the_core_defaults() -> None:
    host = BackendHost("answering", Answering())

    assert host.placement_bundles(OPTIONS) == [{"CPU": 1.0}, {"CPU": 3.0, "coordinator": 1.0}]
    assert host.assign_devices(PLACEMENTS, OPTIONS) == [DeviceAssignment("cpu", "0"), DeviceAssignment("cpu", "1")]


def test_without_an_answer_from_the_backend_the_core_defaults_apply() -> None:
    gpu_options = LaunchOptions(workers=2, use_gpu=True, gpus_per_worker=0.5)
    placements = [WorkerPlacement("node-a", "10.0.0.1", ("1",)), WorkerPlacement("node-a", "10.0.0.1", ("0",))]

    for plugin in (StrategyOnly(), Deferring()):
        host = BackendHost("plain", plugin)
        assert host.placement_bundles(gpu_options) == [{"CPU": 1.0, "GPU": 0.5}] * 2
        assert host.assign_devices(placements, gpu_options) == assign_devices(placements, use_gpu=True)


def test_worker_env_merges_every_plugin_with_the_backend_winning() -> None:
    core_only = BackendHost("plain", StrategyOnly()).worker_env(context())
    env = BackendHost("answering", Answering(), [("extension", Extension())]).worker_env(context())

    assert core_only["RANK"] == "1"
    assert core_only["USER_VAR"] == "from-env-option"
    assert core_only["SHARED"] == "user"
    assert env == {
        **core_only,
        "RANK": "from-backend",
        "SHARED": "backend",
        "BACKEND_ONLY": "b",
        "EXTENSION_ONLY": "e",
    }


def test_an_extension_adds_to_the_core_env_and_overrides_it() -> None:
    env = BackendHost("plain", StrategyOnly(), [("extension", Extension())]).worker_env(context())

    assert (env["SHARED"], env["RANK"], env["EXTENSION_ONLY"]) == ("extension", "from-extension", "e")
    assert env["WORLD_SIZE"] == "2"


def test_worker_actor_options_merge_with_the_backend_winning() -> None:
    core_only = BackendHost("plain", StrategyOnly()).worker_actor_options(OPTIONS, bundle_index=1)
    merged = BackendHost("answering", Answering()).worker_actor_options(OPTIONS, bundle_index=1)

    assert core_only == {"num_cpus": 2.0, "num_gpus": 0, "resources": {}, "max_concurrency": 2}
    assert merged == {**core_only, "max_concurrency": 8, "max_restarts": 1}


def test_an_extension_can_put_the_workers_into_an_existing_placement_group() -> None:
    # Answering first means the default, which would create a placement group through Ray, never runs.
    extension = JoiningAnExistingGroup()
    host = BackendHost("plain", StrategyOnly(), [("tune", extension)])

    reservation = host.reserve_workers([{"CPU": 1.0}] * 3, OPTIONS, name="trial")

    assert reservation.placement_group is extension.group
    assert reservation.bundle_indices == (2, 1, 0)
    assert not reservation.owned


def test_backend_options_come_from_the_backend() -> None:
    assert BackendHost("answering", Answering()).backend_options() == {"answer": "the backend's own option"}
    assert BackendHost("plain", StrategyOnly()).backend_options() == {}


def test_a_backend_without_a_strategy_class_cannot_be_used() -> None:
    host = BackendHost("incomplete", NoStrategy())

    with pytest.raises(BackendLoadError, match="Backend 'incomplete' implements no raylane_strategy_class hook"):
        host.strategy_class()


def test_the_host_holds_the_core_defaults_the_extensions_and_the_backend() -> None:
    host = BackendHost("answering", Answering(), [("extension", Extension())])

    assert sorted(host.plugin_names) == ["backend:answering", "extension", "raylane.builtin"]
    assert host.strategy_class() is StrategyOnly
