"""The Gloo rendezvous: an HTTP key-value store on rank 0's node, which every worker's ``hvd.init()`` meets at.

Horovod's launchers (horovodrun, horovod.ray) run this store in their driver. Here the Ray workers are the whole job,
so rank 0 serves it from a thread, on a port the OS picks, for the length of one entry point; the other ranks learn
the port from the core's torch.distributed store (:func:`publish_port`).
The same store first carries the node layout, which Horovod's cross-node ranks need and the context does not hold.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Mapping
from typing import Any

from raylane.errors import RaylaneError

LAYOUT_SCOPE = "raylane_layout"
POLL_S = 0.05
REQUEST_TIMEOUT_S = 5.0


class RendezvousError(RaylaneError):
    """The workers could not meet at the rendezvous store in time."""


class RendezvousStore:
    """Horovod's own rendezvous HTTP server, listening on a port the OS picks (see :attr:`port`)."""

    def __init__(self) -> None:
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

        self._server: Any = RendezvousHTTPServer(("", 0), RendezvousHandler, 0)
        self._thread = threading.Thread(target=self._server.serve_forever, name="horovod-rendezvous", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class StoreClient:
    """The few requests raylane makes to the store itself (Horovod's C++ side makes the rest)."""

    def __init__(self, addr: str, port: int, deadline: float) -> None:
        self.addr, self.port, self.deadline = addr, port, deadline

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.addr, self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            connection.request(method, path, body=body, headers={"Content-Length": str(len(body or b""))})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _until_deadline(self, what: str, attempt: Any) -> Any:
        last_error: Exception | None = None
        while time.monotonic() < self.deadline:
            try:
                result = attempt()
            except OSError as err:  # rank 0 has not started listening yet, or is busy
                last_error = err
            else:
                if result is not None:
                    return result
            time.sleep(POLL_S)
        detail = f" (last error: {last_error})" if last_error else ""
        raise RendezvousError(f"Horovod rendezvous at {self.addr}:{self.port}: timed out waiting for {what}{detail}.")

    def wait_until_serving(self) -> None:
        self._until_deadline("rank 0's rendezvous store to start", lambda: self._request("GET", "/raylane/ping")[0])

    def put(self, scope: str, key: str, value: str) -> None:
        self._until_deadline(
            f"{scope}/{key} to be stored", lambda: self._request("PUT", f"/{scope}/{key}", value.encode())
        )

    def get(self, scope: str, key: str) -> str:
        def attempt() -> str | None:
            status, body = self._request("GET", f"/{scope}/{key}")
            return body.decode() if status == 200 else None

        return self._until_deadline(f"{scope}/{key} from the other workers", attempt)  # type: ignore[no-any-return]


def exchange_layout(
    client: StoreClient, global_rank: int, world_size: int, node_rank: int, local_rank: int
) -> Mapping[int, tuple[int, int]]:
    """Every worker's (node rank, local rank), by global rank: each worker publishes its own, then reads the others."""
    client.put(LAYOUT_SCOPE, str(global_rank), f"{node_rank},{local_rank}")
    layout = {}
    for rank in range(world_size):
        node, local = client.get(LAYOUT_SCOPE, str(rank)).split(",")
        layout[rank] = (int(node), int(local))
    return layout


PORT_KEY = "raylane_horovod/rendezvous_port"


def publish_port(master_addr: str, master_port: int, store: RendezvousStore | None, timeout_s: float) -> int:
    """Rank 0 (``store`` given) publishes its store's port in the core's torch.distributed store; every rank returns
    it, waiting up to ``timeout_s`` for rank 0."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    torch_store = TCPStore(master_addr, master_port, None, False, timeout=timedelta(seconds=timeout_s))
    if store is not None:
        torch_store.set(PORT_KEY, str(store.port))
    try:
        return int(torch_store.get(PORT_KEY))
    except RuntimeError as err:  # torch raises its timeout as a RuntimeError subclass
        raise RendezvousError(f"rank 0 did not publish its Horovod rendezvous port within {timeout_s:g} s") from err
