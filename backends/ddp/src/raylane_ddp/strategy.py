"""``RayDDPStrategy``: Lightning's DDPStrategy, launched on raylane's Ray workers (either Lightning namespace)."""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any, ClassVar

from raylane.errors import ConfigurationError, advise_on_unused_parameters
from raylane.strategy import RayClusterEnvironment, RayStrategyMixin
from raylane_ddp import process_group_backend

COMM_HOOK_OPTIONS = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper")


class RayDDPStrategy(RayStrategyMixin, lightning_base="DDPStrategy"):
    """torch DistributedDataParallel across ``workers`` Ray actors. Build it with ``get_strategy("ddp", ...)``."""

    backend_name: ClassVar[str] = "ddp"
    strategy_name = "ray_ddp"

    def __init__(self, workers: int = 2, **options: Any) -> None:
        ddp_options = self.init_ray_options({"workers": workers, **options})
        # Validate now, before any actor starts; the workers apply it in raylane_setup_process_group.
        try:
            chosen = process_group_backend(ddp_options.get("process_group_backend"), self.launch_options.use_gpu)
        except ValueError as err:
            raise ConfigurationError(str(err)) from None
        if chosen == "nccl" and self.launch_options.gpus < 1:
            raise ConfigurationError(
                f"gpus_per_worker={self.launch_options.gpus:g} puts several workers on one GPU, and NCCL refuses two "
                "ranks on one device (measured on an H100: ncclInvalidUsage). Pass process_group_backend='gloo' to "
                "share GPUs, or whole GPUs per worker."
            )
        if not self.launch_options.use_gpu and any(ddp_options.get(name) for name in COMM_HOOK_OPTIONS):
            warnings.warn(
                "ddp_comm_hook and ddp_comm_wrapper take effect on GPU workers only: Lightning's DDPStrategy registers "
                "DDP communication hooks on CUDA devices alone, so these CPU workers train without them.",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(
            cluster_environment=RayClusterEnvironment(),
            timeout=timedelta(seconds=self.launch_options.collective_timeout),
            **ddp_options,
        )

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        advise_on_unused_parameters(exception, "get_strategy('ddp', workers=..., find_unused_parameters=True)")
