"""Exceptions raylane raises. Each one says what went wrong and what to do about it."""

from __future__ import annotations

import functools
import re
from typing import ClassVar

# A backward pass left some parameters without a gradient: DDP's reducer (Lightning rewords it, naming its own
# strategies), and FairScale's ShardedDataParallel, which only asserts.
_UNUSED_PARAMETERS = re.compile(
    r"Expected to have finished reduction in the prior iteration|not used in producing the loss|"
    r"sharded_ddp\.py.*assert param\.grad is not None",
    re.DOTALL,
)


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


class StorageError(RaylaneError):
    """A checkpoint or log URL (s3://, gs://, ...) the workers cannot use: its filesystem package is missing there,
    its bucket does not exist, or the store refuses their credentials. Raised before any training."""


class WorkerError(RaylaneError):
    """A worker raised or died. Carries the rank, the node and the worker's own traceback.

    When the worker raised, the error made by :func:`worker_error` is also an instance of the worker's exception class
    where that class allows it (as Ray's ``RayTaskError`` is): ``except ValueError`` around ``trainer.fit`` catches a
    worker's ``ValueError``. ``worker_exception_class`` names that class; None on a plain ``WorkerError``.
    """

    worker_exception_class: ClassVar[type[Exception] | None] = None

    def __init__(self, message: str, *, rank: int, node_ip: str, node_id: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.node_ip = node_ip
        self.node_id = node_id

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields: rebuild explicitly, so copy.copy and pickle (Ray Tune does both) keep the error intact.
        fields = (str(self), self.rank, self.node_ip, self.node_id, self.worker_exception_class)
        return _rebuild_worker_error, fields


def worker_error(
    message: str, *, rank: int, node_ip: str, node_id: str, raised: BaseException | None = None
) -> WorkerError:
    """The driver's error for a failed worker: a :class:`WorkerError` that is also an instance of ``type(raised)``
    when Python allows such a class and it builds from the message alone; else a plain :class:`WorkerError`."""
    own_class = type(raised) if isinstance(raised, Exception) and not isinstance(raised, WorkerError) else None
    return _rebuild_worker_error(message, rank, node_ip, node_id, own_class)


@functools.cache
def _dual_class(raised: type[Exception]) -> type[WorkerError] | None:
    """``WorkerError(<raised>)``, made once per class, so the errors of one class share one type."""
    try:
        return type(
            f"WorkerError({raised.__name__})",
            (WorkerError, raised),
            {
                "__module__": __name__,
                "worker_exception_class": raised,
                # The message is raylane's (rank, node, traceback); the class's own __str__ may read fields it lacks.
                "__str__": BaseException.__str__,
                "__repr__": BaseException.__repr__,
            },
        )
    except TypeError:  # final classes (bool-like), incompatible layouts, metaclass conflicts
        return None


def _rebuild_worker_error(
    message: str, rank: int, node_ip: str, node_id: str, raised: type[Exception] | None = None
) -> WorkerError:
    dual = _dual_class(raised) if raised is not None else None
    if dual is not None:
        try:
            return dual(message, rank=rank, node_ip=node_ip, node_id=node_id)
        except Exception:  # the class's own __init__ or __new__ wants other arguments
            pass
    return WorkerError(message, rank=rank, node_ip=node_ip, node_id=node_id)


def advise_on_unused_parameters(exception: BaseException, remedy: str) -> None:
    """Add raylane's ``remedy`` (the strategy to build instead) to the message of an error a rank raised because a
    backward pass left parameters without a gradient: Lightning's message names its own strategy strings, which would
    leave raylane, and FairScale's is a bare assert. Called from a strategy's ``on_exception``, on the driver."""
    text = str(exception)
    if len(exception.args) == 1 and _UNUSED_PARAMETERS.search(text) and remedy not in text:
        exception.args = (
            f"{text}\nSome parameters got no gradient in a backward pass (a layer the loss does not use, or optimizers "
            f"stepped by hand on separate layers, as a GAN's). With raylane, build the strategy as {remedy}.",
        )


class WeightsNotOnDriverWarning(UserWarning):
    """Weights the workers trained that the driver's LightningModule has no place for (layers built in
    ``configure_model``): kept beside it for its next entry point (:func:`raylane.trained_state_dict` has them), and
    in the checkpoints, but not in its ``state_dict()``."""
