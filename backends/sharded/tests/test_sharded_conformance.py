"""The core's conformance suite, unchanged, once per engine this backend ships."""

from raylane.testing import BackendConformance


class TestFairScaleConformance(BackendConformance):
    backend = "sharded"  # the default engine, fairscale


class TestZeroConformance(BackendConformance):
    backend = "sharded"
    backend_options = {"engine": "zero"}
