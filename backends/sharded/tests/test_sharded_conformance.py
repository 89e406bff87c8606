"""The core's conformance suite, unchanged: whole for the default engine, the results half for the other."""

from raylane.testing import BackendConformance, ResultsConformance


class TestFairScaleConformance(BackendConformance):
    backend = "sharded"  # the default engine, fairscale


class TestZeroConformance(ResultsConformance):
    """Failure handling is the core's and the engine takes no part in it: the fairscale class proves it once."""

    backend = "sharded"
    backend_options = {"engine": "zero"}
