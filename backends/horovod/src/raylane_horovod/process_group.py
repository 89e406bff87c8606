"""Horovod's life on one worker: ``hvd.init()`` before each entry point, ``hvd.shutdown()`` after it.

Workers are reused across entry points (fit, then test ...), and Horovod supports shutting down and initialising
again in one process (``horovod_shutdown`` resets its init flag; elastic Horovod relies on it). Each entry point gets
a fresh rendezvous (the core serves a new store every run), so nothing from the previous one can interfere.
"""

from __future__ import annotations

import os
import time

from raylane import WorkerContext
from raylane.errors import RaylaneError
from raylane_horovod.rendezvous import RendezvousStore, StoreClient, exchange_layout, publish_port
from raylane_horovod.settings import StallTimeouts, cross_ranks


class HorovodInitError(RaylaneError):
    """Horovod cannot serve this worker: built without GPU support, or up with other ranks than Ray assigned."""


# The store rank 0 serves while its entry point runs. One per process: a worker runs one entry point at a time.
_store: RendezvousStore | None = None


def start(context: WorkerContext) -> None:
    """Bring Horovod up on this worker (the ``raylane_setup_process_group`` hook)."""
    global _store
    import horovod.torch as hvd

    stop(context)  # a previous entry point that failed before its teardown
    if context.uses_gpu and not (hvd.cuda_built() or hvd.rocm_built()):
        raise HorovodInitError(
            "use_gpu=True, but this Horovod was built without GPU support. Rebuild it on a machine with the CUDA "
            "toolkit and NCCL: HOROVOD_GPU_OPERATIONS=NCCL python -m raylane_horovod.build_horovod --install."
        )
    if context.global_rank == 0:
        _store = RendezvousStore()
    gloo_s = StallTimeouts.within(context.options.collective_timeout).gloo_s
    deadline = time.monotonic() + gloo_s
    port = publish_port(context.master_addr, context.master_port, _store, gloo_s)
    os.environ["HOROVOD_GLOO_RENDEZVOUS_PORT"] = str(port)
    client = StoreClient(context.master_addr, port, deadline)
    client.wait_until_serving()
    if context.ranks.num_nodes == 1:
        cross_rank, cross_size = 0, 1
    else:
        layout = exchange_layout(client, context.global_rank, context.world_size, context.node_rank, context.local_rank)
        cross_rank, cross_size = cross_ranks(layout, context.global_rank)
    os.environ["HOROVOD_CROSS_RANK"] = str(cross_rank)
    os.environ["HOROVOD_CROSS_SIZE"] = str(cross_size)
    if "HOROVOD_GLOO_IFACE" not in context.env:
        interface = _interface_of(context.placement.node_ip)
        if interface is not None:
            os.environ["HOROVOD_GLOO_IFACE"] = interface
    hvd.init()
    if (hvd.rank(), hvd.size(), hvd.local_rank()) != (context.global_rank, context.world_size, context.local_rank):
        raise HorovodInitError(
            f"Horovod initialised as rank {hvd.rank()} of {hvd.size()} (local rank {hvd.local_rank()}), but Ray "
            f"assigned rank {context.global_rank} of {context.world_size} (local rank {context.local_rank})."
        )


def stop(context: WorkerContext) -> None:
    """Shut Horovod down and close the store (the ``raylane_teardown_process_group`` hook). Safe to repeat."""
    global _store
    import horovod.torch as hvd

    hvd.shutdown()  # a no-op when Horovod is not running
    if _store is not None:
        _store.close()
        _store = None


def _interface_of(ip: str) -> str | None:
    """The network interface that carries ``ip`` (Gloo binds to an interface; the node IP is the one Ray uses)."""
    import psutil  # a Horovod dependency

    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address == ip for address in addresses):
            return name
    return None
