"""Test helpers for raylane backends: the conformance suite, small models, and Ray state checks."""

from raylane.testing.conformance import BackendConformance, FailureConformance, ResultsConformance
from raylane.testing.equivalence import assert_same_weights, fit_distributed, fit_one_process, validation_loader
from raylane.testing.faults import KilledOnce, signal_worker, worker_pid
from raylane.testing.models import (
    ClassifierModel,
    HeadBuiltInConfigureModel,
    ManuallyOptimizedClassifier,
    ReferenceSampler,
    TwoOptimizerClassifier,
    make_dataset,
    make_loader,
    weight_fingerprint,
)
from raylane.testing.processes import env_without_ray_address, free_port, printed_report, python_path_running_at_startup
from raylane.testing.ray_state import assert_released, ensure_local_ray
from raylane.testing.trainers import QUIET, quiet_trainer

__all__ = [
    "QUIET",
    "BackendConformance",
    "ClassifierModel",
    "FailureConformance",
    "HeadBuiltInConfigureModel",
    "KilledOnce",
    "ManuallyOptimizedClassifier",
    "ReferenceSampler",
    "ResultsConformance",
    "TwoOptimizerClassifier",
    "assert_released",
    "assert_same_weights",
    "ensure_local_ray",
    "env_without_ray_address",
    "fit_distributed",
    "fit_one_process",
    "free_port",
    "make_dataset",
    "make_loader",
    "printed_report",
    "python_path_running_at_startup",
    "quiet_trainer",
    "signal_worker",
    "validation_loader",
    "weight_fingerprint",
    "worker_pid",
]
