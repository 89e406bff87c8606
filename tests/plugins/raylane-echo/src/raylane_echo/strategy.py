"""The echo backend's Lightning strategy: Lightning's DDPStrategy on raylane's launcher, built without raylane_ddp.

Written once for both Lightning namespaces; the echo hook returns this namespace-free class and raylane builds it for
the Trainer's namespace.
"""

from __future__ import annotations

from typing import Any, ClassVar

from raylane.strategy import RayClusterEnvironment, RayStrategyMixin


class EchoStrategy(RayStrategyMixin, lightning_base="DDPStrategy"):
    backend_name: ClassVar[str] = "echo"

    def __init__(self, workers: int = 2, **options: Any) -> None:
        self.init_ray_options({"workers": workers, **options})
        super().__init__(cluster_environment=RayClusterEnvironment())
        self.echo_messages: list[tuple[str, Any]] = []
        self.echo_results: dict[str, Any] = {}
