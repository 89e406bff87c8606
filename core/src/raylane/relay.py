"""Messages from rank 0 to the driver while an entry point is still running (metric relay).

Rank 0 calls :func:`send`; the message waits in the worker's outbox until the driver's next poll takes the whole
batch, so sending never blocks training on the network. On the driver each message reaches the
``raylane_relay_metrics`` hook. On other ranks, and outside raylane, :func:`send` does nothing.
"""

from __future__ import annotations

import threading
from typing import Any

CHECKPOINT_SAVED = "raylane.checkpoint_saved"
"""Topic the core uses for the path of each checkpoint rank 0 saves; the launcher consumes it."""


class Outbox:
    """A thread-safe queue the training thread fills and the driver's poll drains."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[tuple[str, Any]] = []

    def put(self, topic: str, payload: Any) -> None:
        with self._lock:
            self._messages.append((topic, payload))

    def drain(self) -> list[tuple[str, Any]]:
        with self._lock:
            messages, self._messages = self._messages, []
        return messages


_active: Outbox | None = None


def send(topic: str, payload: Any) -> bool:
    """Relay ``payload`` to the driver under ``topic``. Returns False when there is no driver to relay to here."""
    outbox = _active
    if outbox is None:
        return False
    outbox.put(topic, payload)
    return True


def activate(outbox: Outbox | None) -> None:
    """Route :func:`send` in this process to ``outbox`` (the worker does this on rank 0), or turn it off."""
    global _active
    _active = outbox
