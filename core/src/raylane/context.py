"""What one worker is told about its place in the run. Built on the driver, read by hooks on the worker."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from raylane.options import LaunchOptions
from raylane.topology import DeviceAssignment, Ranks, WorkerPlacement


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker needs before the Lightning entry point runs: ranks, rendezvous, device, env."""

    backend: str
    options: LaunchOptions
    placement: WorkerPlacement
    ranks: Ranks
    devices: DeviceAssignment
    master_addr: str
    master_port: int
    driver_node_id: str = ""  # "" when the driver is no Ray node (Ray Client): rank 0's files are always sent
    driver_cwd: str = ""  # where the driver resolves relative paths (loggers, checkpoints); "" when unknown
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # credentials: never in a repr
    driver_sys_path: tuple[str, ...] = ()

    @property
    def global_rank(self) -> int:
        return self.ranks.global_rank

    @property
    def local_rank(self) -> int:
        return self.ranks.local_rank

    @property
    def node_rank(self) -> int:
        return self.ranks.node_rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def device(self) -> str:
        return self.devices.device

    @property
    def uses_gpu(self) -> bool:
        return self.devices.device.startswith("cuda")

    @property
    def init_method(self) -> str:
        """The torch.distributed rendezvous address (TCP store on rank 0's node)."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"
