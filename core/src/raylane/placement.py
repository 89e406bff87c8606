"""Reserves the workers' resources as one placement group, failing fast when the cluster can never hold them.

A request the cluster can never satisfy fails at once with what was asked and what exists. One that fits but finds
the resources busy (or waits for an autoscaler) waits up to ``resource_timeout``, logging what it waits for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from raylane.errors import ResourceError

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class WorkerReservation:
    """The placement group the workers run in and each worker's bundle in it (rank order)."""

    placement_group: PlacementGroup
    bundle_indices: tuple[int, ...]
    owned: bool = True  # the run created it and removes it afterwards

    def release(self) -> None:
        if self.owned:
            release(self.placement_group)

    def held_per_node(self, node_ids: Sequence[str]) -> dict[str, dict[str, float]]:
        """What the workers' bundles hold on each node (``node_ids`` in rank order): what returns there on release."""
        bundles: dict[str, list[Mapping[str, float]]] = {}
        for node_id, index in zip(node_ids, self.bundle_indices, strict=True):
            bundles.setdefault(node_id, []).append(self.placement_group.bundle_specs[index])
        return {node_id: summed(on_node) for node_id, on_node in bundles.items()}


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_can_ever_fit(
    bundles: Sequence[Mapping[str, float]], strategy: str, nodes: Sequence[Mapping[str, float]]
) -> None:
    """Raise :class:`ResourceError` if no amount of waiting lets this cluster place ``bundles``."""
    total_asked = summed(bundles)
    total_cluster = summed(nodes)
    summary = _describe(bundles, strategy, nodes)
    missing = sorted(name for name in total_asked if total_cluster.get(name, 0) <= 0)
    if missing:
        hint = " Pass use_gpu=False or run on a cluster with GPU nodes." if "GPU" in missing else ""
        raise ResourceError(f"The cluster has no {', '.join(missing)} resources. {summary}{hint}")
    for name, amount in total_asked.items():
        if amount > total_cluster.get(name, 0) + 1e-9:
            raise ResourceError(f"The workers need more {name} than the whole cluster has. {summary}")
    shapes = {tuple(sorted(bundle.items())) for bundle in bundles}  # workers share a few shapes: check each once
    if any(not any(fits(dict(shape), node) for node in nodes) for shape in shapes):
        raise ResourceError(f"One worker's resources exceed every single node. {summary}")
    if strategy == "STRICT_PACK" and not any(fits(total_asked, node) for node in nodes):
        raise ResourceError(f"STRICT_PACK needs all workers on one node, and no node is big enough. {summary}")
    if strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
        raise ResourceError(f"STRICT_SPREAD needs one node per worker but the cluster has {len(nodes)}. {summary}")


def reserve(bundles: Sequence[Mapping[str, float]], strategy: str, timeout_s: float, name: str) -> PlacementGroup:
    """Create the placement group and wait until Ray has placed every bundle."""
    check_can_ever_fit(bundles, strategy, cluster_nodes())
    group = placement_group([dict(b) for b in bundles], strategy=strategy, name=name)
    deadline = time.monotonic() + timeout_s
    ready = group.ready()
    while True:
        remaining = deadline - time.monotonic()
        done, _ = ray.wait([ready], timeout=max(0.0, min(_PROGRESS_EVERY_S, remaining)))
        if done:
            return group
        if time.monotonic() >= deadline:
            remove_placement_group(group)
            raise ResourceError(
                f"Timed out after {timeout_s:.0f} s (resource_timeout) waiting for resources that are busy. "
                f"{_describe(bundles, strategy, cluster_nodes())} Available now: {_fmt(ray.available_resources())}."
            )
        log.warning(
            "raylane is waiting for %s (%s); available now: %s; giving up in %.0f s (resource_timeout).",
            _fmt(summed(bundles)),
            strategy,
            _fmt(ray.available_resources()),
            deadline - time.monotonic(),
        )


def release(group: PlacementGroup | None) -> None:
    if group is None:
        return
    try:
        remove_placement_group(group)
    except Exception:  # already removed, or Ray is shutting down: nothing left to release
        log.debug("placement group %s already released", group.id, exc_info=True)


def fits(asked: Mapping[str, float], node: Mapping[str, float]) -> bool:
    """Whether ``node`` (a node's total or free resources) has every amount ``asked`` names."""
    return all(node.get(name, 0) + 1e-9 >= amount for name, amount in asked.items())


def summed(resource_sets: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each resource's total over ``resource_sets`` (bundles, nodes, free and held amounts)."""
    total: dict[str, float] = {}
    for resources in resource_sets:
        for name, amount in resources.items():
            total[name] = total.get(name, 0) + amount
    return total


def _describe(bundles: Sequence[Mapping[str, float]], strategy: str, nodes: Sequence[Mapping[str, float]]) -> str:
    per_worker = _fmt(bundles[0]) if bundles and all(b == bundles[0] for b in bundles) else str(list(bundles))
    shown = {name for bundle in bundles for name in bundle} | {"CPU", "GPU"}
    node_list = "; ".join(_fmt({k: v for k, v in node.items() if k in shown}) for node in nodes)
    return (
        f"Asked for {len(bundles)} worker(s) x {per_worker} (placement {strategy}), {_fmt(summed(bundles))} in all; "
        f"the cluster has {_fmt({k: v for k, v in summed(nodes).items() if k in shown})} on {len(nodes)} node(s) "
        f"[{node_list}]."
    )


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in sorted(resources.items())) + "}"
