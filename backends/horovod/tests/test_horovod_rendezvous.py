"""The rendezvous store rank 0 serves, and the node-layout exchange the workers run through it before ``hvd.init()``.

Threads stand in for the workers of a multi-node job (the machine has one node), against the real store on localhost.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from raylane.topology import WorkerPlacement, assign_ranks
from raylane_horovod.rendezvous import RendezvousError, RendezvousStore, StoreClient, exchange_layout
from raylane_horovod.settings import cross_ranks

pytest.importorskip("horovod.runner.http.http_server", reason="Horovod is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def test_workers_on_uneven_nodes_learn_the_whole_layout() -> None:
    # 3 workers on node a, 1 on node b, 2 on node c: local rank 2 exists on node a only.
    placements = [WorkerPlacement(node, node) for node in ("a", "a", "a", "b", "c", "c")]
    ranks = assign_ranks(placements)
    store = RendezvousStore()
    port = store.port
    try:

        def worker(rank: int) -> tuple[int, int]:
            client = StoreClient("127.0.0.1", port, deadline=time.monotonic() + 30)
            client.wait_until_serving()
            mine = ranks[rank]
            layout = exchange_layout(client, rank, mine.world_size, mine.node_rank, mine.local_rank)
            return cross_ranks(layout, rank)

        with ThreadPoolExecutor(len(ranks)) as pool:
            crossed = list(pool.map(worker, range(len(ranks))))
    finally:
        store.close()
    # (cross rank, cross size) per global rank: local rank 0 on nodes a, b, c; local rank 1 on a, c; 2 on a.
    assert crossed == [(0, 3), (0, 2), (0, 1), (1, 3), (2, 3), (1, 2)]


def test_a_missing_store_fails_by_the_deadline() -> None:
    client = StoreClient("127.0.0.1", free_port(), deadline=time.monotonic() + 1)
    started = time.monotonic()
    with pytest.raises(RendezvousError, match="rank 0's rendezvous store to start"):
        client.wait_until_serving()
    assert time.monotonic() - started < 10


def test_the_store_frees_its_port_when_closed() -> None:
    store = RendezvousStore()
    port = store.port
    assert port > 0, "the OS picked a port"
    store.close()
    with socket.socket() as sock:
        sock.bind(("", port))  # nothing listens there any more
