"""The echo backend's Lightning strategy: Lightning's DDPStrategy on raylane's launcher, built without raylane_ddp."""

from __future__ import annotations

from typing import Any, ClassVar

from pytorch_lightning.strategies import DDPStrategy

from raylane.strategy import RayClusterEnvironment, RayStrategyMixin


class EchoStrategy(RayStrategyMixin, DDPStrategy):
    backend_name: ClassVar[str] = "echo"

    def __init__(self, workers: int = 2, **options: Any) -> None:
        self.init_ray_options({"workers": workers, **options})
        super().__init__(cluster_environment=RayClusterEnvironment())
        self.echo_messages: list[tuple[str, Any]] = []
        self.echo_results: dict[str, Any] = {}
