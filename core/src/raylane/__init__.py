"""raylane: distributed PyTorch Lightning training on Ray actors, with pluggable backends.

``pl.Trainer(strategy=get_strategy("ddp", workers=4))`` runs the Trainer's entry points on four Ray actors and brings
the trained weights, metrics and checkpoints back to this process.
"""

from raylane import _lightning
from raylane.api import get_strategy, register_with_lightning, release_idle_workers
from raylane.context import WorkerContext
from raylane.errors import (
    BackendConflictError,
    BackendLoadError,
    BackendNotFoundError,
    ConfigurationError,
    RaylaneError,
    ResourceError,
    SerializationError,
    StorageError,
    WeightsNotOnDriverWarning,
    WorkerError,
)
from raylane.hookspecs import hookimpl
from raylane.local_ray import start_at_import, start_ray_in_background
from raylane.options import LaunchOptions
from raylane.registry import BackendInfo, list_backends
from raylane.worker_only_weights import trained_state_dict

__all__ = [
    "BackendConflictError",
    "BackendInfo",
    "BackendLoadError",
    "BackendNotFoundError",
    "ConfigurationError",
    "LaunchOptions",
    "RaylaneError",
    "ResourceError",
    "SerializationError",
    "StorageError",
    "WeightsNotOnDriverWarning",
    "WorkerContext",
    "WorkerError",
    "get_strategy",
    "hookimpl",
    "list_backends",
    "release_idle_workers",
    "start_ray_in_background",
    "trained_state_dict",
]

__version__ = "0.1.0"

# Trainer(strategy="ray_<backend>") in every Lightning namespace, whether imported before raylane or after.
_lightning.when_imported(register_with_lightning)

# A training script that leaves Ray to raylane gets its local Ray starting now, while it imports Lightning
# (raylane.local_ray; RAYLANE_EARLY_START=0 turns it off).
start_at_import()
