"""``RayDDPStrategy``: Lightning's DDPStrategy, launched on raylane's Ray workers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar

from pytorch_lightning.strategies import DDPStrategy
from raylane.errors import ConfigurationError
from raylane.strategy import RayClusterEnvironment, RayStrategyMixin

from raylane_ddp import process_group_backend


class RayDDPStrategy(RayStrategyMixin, DDPStrategy):
    """torch DistributedDataParallel across ``workers`` Ray actors. Build it with ``get_strategy("ddp", ...)``."""

    backend_name: ClassVar[str] = "ddp"
    strategy_name = "ray_ddp"

    def __init__(self, workers: int = 2, **options: Any) -> None:
        ddp_options = self.init_ray_options({"workers": workers, **options})
        requested = ddp_options.get("process_group_backend")
        if requested is not None:
            # Validate now, before any actor starts; the workers apply it in raylane_setup_process_group.
            try:
                process_group_backend(requested, self.launch_options.use_gpu)
            except ValueError as err:
                raise ConfigurationError(str(err)) from None
        super().__init__(
            cluster_environment=RayClusterEnvironment(),
            timeout=timedelta(seconds=self.launch_options.collective_timeout),
            **ddp_options,
        )
