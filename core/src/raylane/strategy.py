"""What turns a Lightning parallel strategy into one that runs on raylane's Ray workers.

A backend's strategy is ``class MyStrategy(RayStrategyMixin, SomeLightningParallelStrategy)``. The mixin supplies the
launcher, the ranks Ray decided and the worker's device; the Lightning base class keeps doing the training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning_fabric.plugins.environments import ClusterEnvironment
from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from raylane import relay
from raylane._lightning import Launcher, LauncherSlot
from raylane.options import LaunchOptions, split_options

if TYPE_CHECKING:
    from raylane.context import WorkerContext


class RayClusterEnvironment(ClusterEnvironment):
    """Ranks and rendezvous exactly as the launcher assigned them.

    On the driver it describes a single rank-0 process; inside a worker it is filled from the worker's context.
    """

    def __init__(self) -> None:
        self.context: WorkerContext | None = None

    @property
    def creates_processes_externally(self) -> bool:
        return True  # the Ray launcher starts them, not Lightning

    @property
    def main_address(self) -> str:
        return self.context.master_addr if self.context else "127.0.0.1"

    @property
    def main_port(self) -> int:
        return self.context.master_port if self.context else 0

    @staticmethod
    def detect() -> bool:
        return False  # only ever chosen explicitly, by a raylane strategy

    def world_size(self) -> int:
        return self.context.world_size if self.context else 1

    def set_world_size(self, size: int) -> None:
        """Ignored: Ray's placement fixes the world size."""

    def global_rank(self) -> int:
        return self.context.global_rank if self.context else 0

    def set_global_rank(self, rank: int) -> None:
        """Ignored: Ray's placement fixes the ranks."""

    def local_rank(self) -> int:
        return self.context.local_rank if self.context else 0

    def node_rank(self) -> int:
        return self.context.node_rank if self.context else 0


class RayStrategyMixin(LauncherSlot):
    """Runs a Lightning ``ParallelStrategy`` subclass on raylane's workers. Put it first in the bases."""

    backend_name: ClassVar[str]
    launch_options: LaunchOptions
    backend_options: dict[str, Any]
    cluster_environment: ClusterEnvironment | None
    accelerator: Any

    def init_ray_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate ``get_strategy``-style options; keep the shared ones and return the backend's own."""
        from raylane.registry import backend_host

        known = backend_host(self.backend_name).backend_options()
        self.launch_options, self.backend_options = split_options(options, known, self.backend_name)
        return dict(self.backend_options)

    @property
    def ray_environment(self) -> RayClusterEnvironment:
        assert isinstance(self.cluster_environment, RayClusterEnvironment), "raylane strategies need their environment"
        return self.cluster_environment

    @property
    def worker_context(self) -> WorkerContext | None:
        """This process's context inside a worker; ``None`` on the driver."""
        return self.ray_environment.context

    def make_launcher(self) -> Launcher:
        from raylane.launcher import RayLauncher

        return RayLauncher(self)

    def release_workers(self) -> None:
        """Stop this strategy's warm Ray workers now (they are otherwise kept for the Trainer's next entry point)."""
        launcher = getattr(self, "_launcher", None)
        if launcher is not None:
            launcher.release()

    def adopt_worker_context(self, context: WorkerContext) -> None:
        """Called inside a worker before the entry point: take the ranks and device the launcher assigned."""
        self.ray_environment.context = context
        self.accelerator = CUDAAccelerator() if context.uses_gpu else CPUAccelerator()
        self.set_world_ranks()

    @property
    def root_device(self) -> torch.device:
        context = self.worker_context
        return torch.device(context.device if context else "cpu")

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.ray_environment.world_size(), "rank": self.ray_environment.global_rank()}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
        # Tell the driver where the newest checkpoint is, so it can restart a failed fit from it (max_failures).
        if self.ray_environment.global_rank() == 0:
            relay.send(relay.CHECKPOINT_SAVED, str(filepath))

    def set_world_ranks(self) -> None:
        # Ray decides ranks; nothing to compute, only Lightning's rank-zero guards to update.
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.ray_environment.global_rank()  # type: ignore[attr-defined]
