"""``RayDDPStrategy``: Lightning's DDPStrategy, launched on raylane's Ray workers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar

from pytorch_lightning.strategies import DDPStrategy
from raylane.strategy import RayClusterEnvironment, RayStrategyMixin


class RayDDPStrategy(RayStrategyMixin, DDPStrategy):
    """torch DistributedDataParallel across ``workers`` Ray actors. Build it with ``get_strategy("ddp", ...)``."""

    backend_name: ClassVar[str] = "ddp"
    strategy_name = "ray_ddp"

    def __init__(self, workers: int = 2, **options: Any) -> None:
        ddp_options = self.init_ray_options({"workers": workers, **options})
        super().__init__(
            cluster_environment=RayClusterEnvironment(),
            timeout=timedelta(seconds=self.launch_options.collective_timeout),
            **ddp_options,
        )
