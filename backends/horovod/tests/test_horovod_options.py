"""Each horovod option reaches the ``hvd.DistributedOptimizer`` that steps on the workers (needs Horovod built)."""

from __future__ import annotations

import pytest

from raylane import get_strategy
from raylane.testing import ClassifierModel, ensure_local_ray, make_loader, quiet_trainer

hvd = pytest.importorskip("horovod.torch", reason="the horovod nox session builds Horovod; see build_horovod.py")


class ReportsHorovod(ClassifierModel):
    """Logs what the worker's distributed optimizer was built with."""

    def on_train_start(self) -> None:
        (optimizer,) = self.trainer.strategy.optimizers
        assert type(optimizer).__module__.startswith("horovod."), type(optimizer)
        self.log("fp16_compression", float(optimizer._compression is hvd.Compression.fp16), rank_zero_only=True)
        self.log("op_is_sum", float(optimizer.op == hvd.Sum), rank_zero_only=True)
        self.log("predivide", float(optimizer.gradient_predivide_factor), rank_zero_only=True)
        self.log("sparse_as_dense", float(optimizer.sparse_as_dense), rank_zero_only=True)


@pytest.mark.timeout(240)
def test_horovod_options_reach_the_distributed_optimizer_on_the_workers() -> None:
    ensure_local_ray()
    strategy = get_strategy("horovod", workers=2, compression="fp16", op="sum", sparse_as_dense=True, idle_timeout=0)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, enable_checkpointing=False)
    trainer.fit(ReportsHorovod(), make_loader(8))
    names = ("fp16_compression", "op_is_sum", "predivide", "sparse_as_dense")
    reported = {name: float(trainer.callback_metrics[name]) for name in names}
    assert reported == {"fp16_compression": 1.0, "op_is_sum": 1.0, "predivide": 1.0, "sparse_as_dense": 1.0}
