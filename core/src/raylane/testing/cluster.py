"""A multi-node Ray on one machine (Ray's own ``ray.cluster_utils.Cluster``), for tests of placement, node loss and
what outlives a driver: real raylets, one per node, so Ray places and loses workers as on a real cluster."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray.cluster_utils import Cluster

from raylane.testing.processes import free_port


@contextmanager
def local_cluster(head_cpus: float = 0, nodes: Sequence[Mapping[str, Any]] = ()) -> Iterator[Cluster]:
    """A head node with ``head_cpus`` (0: the driver's node runs no worker) and one node per ``nodes`` entry (the
    arguments of ``Cluster.add_node``: ``num_cpus``, ``num_gpus``, ``resources`` ...); this process is connected to it
    while the block runs, and everything is shut down after."""
    ray.shutdown()  # a test's own local Ray would shadow the cluster
    # The head's dashboard agent on a free port: the Ray this replaces, stopped by ray.shutdown(), leaves its agent on
    # Ray's default one for about a minute, and an agent started on it waits 3.4 s for it.
    agent_port = free_port()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": head_cpus, "dashboard_agent_listen_port": agent_port}
    )
    try:
        for node in nodes:
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
