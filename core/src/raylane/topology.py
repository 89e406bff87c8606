"""Ranks and devices from where Ray placed the workers. Pure functions, so every layout can be property-tested."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker actor landed, as the actor itself reported it."""

    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ranks:
    """A worker's position in the process group."""

    global_rank: int
    local_rank: int
    node_rank: int
    world_size: int
    local_world_size: int
    num_nodes: int


@dataclass(frozen=True)
class DeviceAssignment:
    """The device a worker trains on and the GPUs its process may see."""

    device: str
    cuda_visible_devices: str | None = None


def assign_ranks(placements: Sequence[WorkerPlacement]) -> list[Ranks]:
    """Global rank follows bundle order; node and local ranks group workers by Ray node id.

    Node ids, not IPs: several Ray nodes may share one IP (containers, the multi-node test cluster).
    Nodes are numbered in the order their first worker appears, so rank 0 is always on node 0.
    """
    node_order: dict[str, int] = {}
    for placement in placements:
        node_order.setdefault(placement.node_id, len(node_order))
    per_node = Counter(placement.node_id for placement in placements)
    seen: dict[str, int] = {}
    ranks = []
    for global_rank, placement in enumerate(placements):
        local_rank = seen.get(placement.node_id, 0)
        seen[placement.node_id] = local_rank + 1
        ranks.append(
            Ranks(
                global_rank=global_rank,
                local_rank=local_rank,
                node_rank=node_order[placement.node_id],
                world_size=len(placements),
                local_world_size=per_node[placement.node_id],
                num_nodes=len(node_order),
            )
        )
    return ranks


def assign_devices(placements: Sequence[WorkerPlacement], use_gpu: bool) -> list[DeviceAssignment]:
    """Give each worker the first GPU Ray assigned it, indexed within all GPUs of its node's workers.

    Every worker on a node sees the same CUDA_VISIBLE_DEVICES (the union of that node's assigned GPUs), which is what
    NCCL needs for peer-to-peer access; workers sharing a fractional GPU get the same device.
    """
    if not use_gpu:
        return [DeviceAssignment(device="cpu") for _ in placements]
    node_gpus: dict[str, list[str]] = {}
    for placement in placements:
        if not placement.gpu_ids:
            raise ValueError(
                f"use_gpu=True but Ray assigned no GPU to the worker on node {placement.node_ip}; "
                "check the cluster's GPU resources."
            )
        gpus = node_gpus.setdefault(placement.node_id, [])
        gpus.extend(gpu for gpu in placement.gpu_ids if gpu not in gpus)
    for gpus in node_gpus.values():
        gpus.sort(key=_gpu_sort_key)
    assignments = []
    for placement in placements:
        visible = node_gpus[placement.node_id]
        own = sorted(placement.gpu_ids, key=_gpu_sort_key)[0]
        assignments.append(
            DeviceAssignment(device=f"cuda:{visible.index(own)}", cuda_visible_devices=",".join(visible))
        )
    return assignments


def _gpu_sort_key(gpu_id: str) -> tuple[int, int | str]:
    # Ray reports GPU ids as ints or, with some drivers, as UUID strings; sort numbers numerically, strings after.
    return (0, int(gpu_id)) if gpu_id.isdigit() else (1, gpu_id)
