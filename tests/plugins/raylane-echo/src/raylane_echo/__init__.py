"""A third-party raylane backend for tests: DDP over gloo, plus a visible trace of every hook it implements.

Set ``env={"ECHO_DIR": path}`` and each worker writes ``setup-rank<r>`` / ``teardown-rank<r>`` files there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from raylane import LaunchOptions, WorkerContext, hookimpl

ECHO_TAG_DEFAULT = "echo"


@hookimpl
def raylane_strategy_class() -> type:
    # The hook's first form (no `lightning` argument): a namespace-free class, which raylane builds per namespace.
    from raylane_echo.strategy import EchoStrategy

    return EchoStrategy


@hookimpl
def raylane_backend_options() -> Mapping[str, str]:
    return {"echo_tag": "a string every worker sees as ECHO_TAG"}


@hookimpl
def raylane_worker_actor_options(options: LaunchOptions) -> dict[str, Any]:
    runtime_env = dict(options.runtime_env or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "ECHO_ACTOR_OPTION": "set-by-actor-options"}
    return {"runtime_env": runtime_env}


@hookimpl
def raylane_worker_env(context: WorkerContext) -> Mapping[str, str]:
    return {
        "ECHO_RANK_SEEN_BY_DRIVER": str(context.global_rank),
        "ECHO_TAG": str(context.backend_options.get("echo_tag", ECHO_TAG_DEFAULT)),
    }


@hookimpl
def raylane_setup_process_group(context: WorkerContext) -> None:
    import torch.distributed as dist

    _trace("setup", context)
    dist.init_process_group(
        "gloo",
        init_method=context.init_method,
        rank=context.global_rank,
        world_size=context.world_size,
        timeout=timedelta(seconds=context.options.collective_timeout),
    )


@hookimpl
def raylane_teardown_process_group(context: WorkerContext) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _trace("teardown", context)


@hookimpl
def raylane_collect_results(trainer: Any, context: WorkerContext) -> Mapping[str, Any]:
    return {"echo.pid": os.getpid(), "echo.rank": context.global_rank, "echo.tag": os.environ.get("ECHO_TAG")}


@hookimpl
def raylane_apply_results(trainer: Any, results: Mapping[str, Any]) -> None:
    trainer.strategy.echo_results = dict(results)


@hookimpl
def raylane_relay_metrics(trainer: Any, topic: str, payload: Any) -> None:
    if topic.startswith("echo."):
        trainer.strategy.echo_messages.append((topic, payload))


def _trace(event: str, context: WorkerContext) -> None:
    directory = os.environ.get("ECHO_DIR")
    if directory:
        Path(directory, f"{event}-rank{context.global_rank}").write_text(os.environ.get("ECHO_RANK_SEEN_BY_DRIVER", ""))
