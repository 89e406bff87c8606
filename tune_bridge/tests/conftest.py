"""One local Ray for every Tune test: 4 CPUs, exactly what two trials of 2 one-CPU workers hold."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import trial_functions
from ray import cloudpickle

from raylane.testing.s3 import s3_server  # noqa: F401  (the fixture: a real S3-compatible server)

CPUS = 4


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    # address="local": never join another Ray instance running on this machine.
    ray.shutdown()
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    cloudpickle.register_pickle_by_value(trial_functions)
    yield
    cloudpickle.unregister_pickle_by_value(trial_functions)
    ray.shutdown()
