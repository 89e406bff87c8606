"""raylane's ``horovod`` backend: hook implementations only. Horovod and the strategy are imported when first used.

``get_strategy("horovod", workers=N)`` trains with ``hvd.DistributedOptimizer`` on N Ray actors, which meet through
Horovod's Gloo controller (no MPI, no horovodrun). Horovod is not a dependency of this package: its last release does
not build against current torch as published. ``python -m raylane_horovod.build_horovod --install`` builds a patched
wheel; see the package README.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING

from raylane import BackendLoadError, hookimpl
from raylane_horovod.settings import BACKEND_OPTIONS, horovod_env

if TYPE_CHECKING:
    from raylane import WorkerContext
    from raylane_horovod.strategy import RayHorovodStrategy

INSTALL_HINT = (
    "Horovod 0.28.1 (its last release) does not build against torch >= 2.1 from PyPI, so raylane-horovod does not "
    "depend on it. Build and install a patched wheel into this environment with "
    "`python -m raylane_horovod.build_horovod --install` (a few minutes once, then cached in "
    "~/.cache/raylane/wheels); see the raylane-horovod README."
)


def require_horovod() -> None:
    """Fail with the install instructions unless ``horovod.torch`` imports and was built with Gloo."""
    try:
        import horovod.torch as hvd
    except ImportError as err:
        raise BackendLoadError(
            f"Backend 'horovod' needs Horovod with PyTorch support, which does not import here "
            f"({type(err).__name__}: {err}). {INSTALL_HINT}"
        ) from err
    if not hvd.gloo_built():
        raise BackendLoadError(f"Backend 'horovod' needs Horovod built with Gloo; this one is not. {INSTALL_HINT}")


@hookimpl
def raylane_strategy_class(lightning: ModuleType) -> type[RayHorovodStrategy]:
    require_horovod()
    from raylane_horovod.strategy import RayHorovodStrategy

    return RayHorovodStrategy.for_lightning(lightning)


@hookimpl
def raylane_backend_options() -> Mapping[str, str]:
    return BACKEND_OPTIONS


@hookimpl
def raylane_resumes_on_any_world_size() -> bool:
    # Every rank holds the whole model and optimizer state: a checkpoint loads on any number of workers.
    return True


@hookimpl
def raylane_worker_env(context: WorkerContext) -> Mapping[str, str]:
    return horovod_env(context)


@hookimpl
def raylane_setup_process_group(context: WorkerContext) -> None:
    from raylane_horovod import process_group

    process_group.start(context)


@hookimpl
def raylane_teardown_process_group(context: WorkerContext) -> None:
    from raylane_horovod import process_group

    process_group.stop(context)
