"""The only Ray calls outside Ray's public API, kept here so a Ray release that moves them breaks one module.

Each lookup degrades to "Ray cannot say" (None) instead of failing a run; the upload of local code for ``runtime_env``
fails as ``ray.init`` would. ``core/tests/test_ray_internals.py`` (and the runtime_env tests in
``tests/test_user_environment.py``) fail loudly when a Ray release stops answering them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray

log = logging.getLogger(__name__)


def dashboard_url() -> str | None:
    """The Ray dashboard's address, or None when Ray runs without one.

    Ray's only public way to it is the return value of ``ray.init()``, which raylane does not see when the user
    connected; so this asks Ray's worker module.
    """
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # a Ray Client driver, a Ray that moved the function
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


@dataclass(frozen=True)
class WaitingWork:
    """What waits for resources in the cluster, and what each node has free for it."""

    demands: list[Mapping[str, float]]  # one resource bundle per waiting task, actor or placement-group bundle
    free: dict[str, Mapping[str, float]]  # node id (hex) -> its resources that nothing holds


def waiting_work() -> WaitingWork | None:
    """The resource bundles that tasks, actors and placement groups anywhere in the cluster wait for.

    This is what ``ray status`` shows under "Pending demands", read from the control store in a few milliseconds. None
    when Ray cannot say (a Ray Client driver, a Ray that changed the call).
    """
    if not ray.is_initialized():  # asking a shut-down Ray would start a new one
        return None
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
        waiting = [*status.resource_demands.ray_task_actor_demand, *status.resource_demands.placement_group_demand]
        demands = [dict(request.bundle) for demand in waiting for request in demand.bundles_by_count]
        nodes = [*status.active_nodes, *status.idle_nodes]
        return WaitingWork(demands, {node.node_id: node.available_resources() for node in nodes if node.node_id})
    except Exception:
        log.debug("Ray did not report its pending demands", exc_info=True)
        return None


def upload_local_code(runtime_env: Mapping[str, Any]) -> dict[str, Any]:
    """``runtime_env`` with its local ``working_dir`` and ``py_modules`` folders uploaded to Ray, named by URI.

    Ray uploads local folders only for a job's runtime_env (``ray.init``, ``ray job submit``) and rejects them in an
    actor's options; raylane's workers are actors, so the driver uploads them as ``ray.init`` would (content-hashed:
    an unchanged folder is not sent twice). A Ray Client driver's folders are left to Ray, which says what to do.
    """
    env = dict(runtime_env)
    if "working_dir" not in env and "py_modules" not in env:
        return env
    if ray.util.client.ray.is_connected():
        return env
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"  # Ray's own switch
    with tempfile.TemporaryDirectory() as scratch:
        env = upload_py_modules_if_needed(env, include_gitignore=include_gitignore, scratch_dir=scratch, logger=log)
        env = upload_working_dir_if_needed(env, include_gitignore=include_gitignore, scratch_dir=scratch, logger=log)
    env.pop("excludes", None)  # applied by the upload; not an actor option
    return env
