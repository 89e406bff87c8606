"""Exceptions raylane raises. Each one says what went wrong and what to do about it."""

from __future__ import annotations


class RaylaneError(Exception):
    """Base class of every error raylane raises on purpose."""


class ConfigurationError(RaylaneError, ValueError):
    """An option given to raylane (or a Trainer flag) is invalid. Raised before any actor starts."""


class BackendNotFoundError(RaylaneError, LookupError):
    """No installed distribution provides the requested backend."""


class BackendLoadError(RaylaneError, ImportError):
    """A backend's entry point is installed but cannot be imported or is not a valid plugin."""


class BackendConflictError(RaylaneError):
    """Two installed distributions claim the same backend name."""


class ResourceError(RaylaneError):
    """The cluster cannot (or did not in time) provide the resources the workers ask for."""


class SerializationError(RaylaneError, TypeError):
    """Something that must travel to the workers (usually the LightningModule) cannot be pickled."""


class WorkerError(RaylaneError):
    """A worker raised or died. Carries the rank, the node and the worker's own traceback."""

    def __init__(self, message: str, *, rank: int, node_ip: str, node_id: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.node_ip = node_ip
        self.node_id = node_id

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields: rebuild explicitly, so copy.copy and pickle (Ray Tune does both) keep the error intact.
        return _rebuild_worker_error, (str(self), self.rank, self.node_ip, self.node_id)


def _rebuild_worker_error(message: str, rank: int, node_ip: str, node_id: str) -> WorkerError:
    return WorkerError(message, rank=rank, node_ip=node_ip, node_id=node_id)
