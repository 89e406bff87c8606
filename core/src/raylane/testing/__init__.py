"""Test helpers for raylane backends: the conformance suite, small models, and Ray state checks."""

from raylane.testing.conformance import BackendConformance, FailureConformance, ResultsConformance
from raylane.testing.faults import signal_worker, worker_pid
from raylane.testing.models import ClassifierModel, ReferenceSampler, make_dataset, make_loader
from raylane.testing.ray_state import assert_released, ensure_local_ray

__all__ = [
    "BackendConformance",
    "ClassifierModel",
    "FailureConformance",
    "ReferenceSampler",
    "ResultsConformance",
    "assert_released",
    "ensure_local_ray",
    "make_dataset",
    "make_loader",
    "signal_worker",
    "worker_pid",
]
