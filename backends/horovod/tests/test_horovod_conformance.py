import pytest

from raylane.testing import BackendConformance

pytest.importorskip("horovod.torch", reason="Horovod is not installed; see backends/horovod/README.md")


class TestHorovodConformance(BackendConformance):
    backend = "horovod"
