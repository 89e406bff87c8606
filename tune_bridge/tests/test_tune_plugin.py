"""The extension's registration and its contract with Ray Tune's internals (all of them in raylane_tune._ray_tune)."""

from __future__ import annotations

import copy
import inspect
import pickle
import subprocess
import sys

from ray import tune

from raylane import LaunchOptions, WorkerError
from raylane.registry import backend_host, load_extensions
from raylane_tune import _ray_tune, plugin


def test_the_extension_joins_every_backend_host() -> None:
    assert "raylane-tune:tune" in [name for name, _ in load_extensions()]
    assert "raylane-tune:tune" in backend_host("ddp").plugin_names


def test_the_plugin_module_does_not_import_ray_tune() -> None:
    probe = "import sys, raylane_tune.plugin; print('ray.tune' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


def test_outside_a_trial_the_hooks_leave_everything_to_the_core() -> None:
    assert not _ray_tune.in_tune_trial()
    assert plugin.raylane_reserve_workers(bundles=[{"CPU": 1.0}], options=LaunchOptions(workers=1)) is None
    assert plugin.raylane_worker_env() == {}
    assert not plugin.in_trial_worker()


def test_worker_errors_survive_copy_and_pickle() -> None:
    error = WorkerError("rank 1 raised", rank=1, node_ip="10.0.0.2", node_id="abc")
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(clone) is WorkerError and str(clone) == "rank 1 raised"
        assert (clone.rank, clone.node_ip, clone.node_id) == (1, "10.0.0.2", "abc")


# -- Ray Tune's internals that raylane_tune._ray_tune relies on -------------------------------------------------------


def test_ray_tune_imports_its_session_module_with_the_trial_check() -> None:
    module = sys.modules[_ray_tune._SESSION_MODULE]
    assert callable(module._in_tune_session)
    assert not module._in_tune_session()


def test_an_empty_first_bundle_is_dropped_and_flagged() -> None:
    empty_head = tune.PlacementGroupFactory([{}, {"CPU": 1}, {"CPU": 1}])
    assert _ray_tune.head_bundle_is_empty(empty_head)
    assert empty_head.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert not _ray_tune.head_bundle_is_empty(tune.PlacementGroupFactory([{"CPU": 0.5}, {"CPU": 1}]))


def test_the_public_tune_calls_used_exist() -> None:
    assert "checkpoint" in inspect.signature(tune.report).parameters
    assert callable(tune.Checkpoint.from_directory) and callable(tune.get_checkpoint)
    context = tune.get_context()
    assert callable(context.get_trial_resources) and callable(context.get_trial_id)
