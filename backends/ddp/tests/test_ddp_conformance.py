from raylane.testing import BackendConformance


class TestDDPConformance(BackendConformance):
    backend = "ddp"
