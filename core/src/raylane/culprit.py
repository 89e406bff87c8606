"""Which rank to blame when a run fails: the one whose error is its own, not the peers whose errors echo it.

When one rank dies, raises or never reaches a collective, its peers soon fail too, with errors that only echo it
("connection closed by peer", "timed out waiting for recv"). These tell an echo from a cause by the error's text,
which is all that crosses from a worker to the driver.
"""

from __future__ import annotations

import re

# What a rank raises when a peer died or stopped (torch.distributed, Gloo, NCCL, Horovod), as opposed to an error of
# its own.
PEER_FAILURE_MARKERS = (
    "DistNetworkError",
    "DistBackendError",
    "DistStoreError",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "HorovodInternalError",
    "NCCL",
    "Gloo",
    "gloo",
)
# What a rank raises when it gave up waiting for its peers inside a collective: Gloo's transport, NCCL's watchdog,
# Horovod once its stall inspector shut it down. Only these make a rank that is still running the suspect: it is
# where the others waited in vain.
_COLLECTIVE_TIMEOUT = re.compile(
    r"Timed out waiting \d+ms for (recv|send) operation"
    r"|Application timeout caused pair closure"  # Gloo, when the timeout ends a wait on an asynchronous work handle
    r"|Watchdog caught collective operation timeout"
    r"|HorovodInternalError"
)


def echoes_a_peer(error_text: str) -> bool:
    """Whether a rank's error may only echo another rank's failure (so the driver waits briefly for the cause)."""
    return gave_up_waiting(error_text) or any(marker in error_text for marker in PEER_FAILURE_MARKERS)


def gave_up_waiting(error_text: str) -> bool:
    """Whether a rank's error says a collective timed out waiting for its peers (``collective_timeout``)."""
    return _COLLECTIVE_TIMEOUT.search(error_text) is not None


def straggler_report(rank: int, waited_s: float, waiting_ranks: list[int], stack: str | None) -> str:
    """Why a rank that is still running is the one to blame, and where it is."""
    waiting = ", ".join(str(r) for r in waiting_ranks)
    where = (
        f"Rank {rank} was still here:\n{stack.rstrip()}"
        if stack
        else f"Rank {rank} did not say where it was (its process may be frozen)."
    )
    return (
        f"Rank(s) {waiting} gave up after waiting {waited_s:g} s (collective_timeout) in a collective that rank "
        f"{rank} never joined: it is stuck or far slower than its peers (a rank-dependent branch around a "
        f"collective, a blocking call, a deadlock). {where}"
    )
