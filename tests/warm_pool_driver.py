"""Scripts run one after another against one ``ray start --head`` (``RAY_ADDRESS``), for the warm pool's tests.

``python warm_pool_driver.py fit`` trains 2 workers for 2 epochs and prints ``POOL_REPORT {json}``: the trained
weights, and for each rank whether it was claimed from the pool; ``... fit-then-shutdown`` does the same, then calls
``ray.shutdown()`` itself while its workers are still warm. ``... fit-until-killed MARKER`` claims its workers,
writes ``MARKER`` once training runs, and trains until the test kills this driver. What the pool holds meanwhile is
``warm_pool_waiting.py``'s to tell.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
import torch

from raylane import get_strategy
from raylane.testing import ClassifierModel, make_loader

PREFIX = "POOL_REPORT "
RANK_1_WARNING = "rank 1 says: warm pool workers' warnings reach this driver"


class WarningModel(ClassifierModel):
    def on_train_start(self) -> None:
        if self.global_rank == 1:
            warnings.warn(RANK_1_WARNING, stacklevel=1)


class SlowModel(ClassifierModel):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 0:
            Path(self.marker).write_text("training")
        time.sleep(0.5)
        return super().training_step(batch, batch_idx)


def fit(model: ClassifierModel, epochs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=2),
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, make_loader(8, samples=64), make_loader(8, samples=32))
    return {
        "weights": model.layer.weight.flatten().tolist(),
        "pooled": ["claimed_from_pool" in marks for marks in trainer.strategy.launcher.timeline["workers"]],
    }


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1] == "fit":
        report = fit(WarningModel(), epochs=2)
    elif sys.argv[1] == "fit-then-shutdown":
        report = fit(WarningModel(), epochs=2)
        ray.shutdown()
    else:  # fit-until-killed
        report = fit(SlowModel(sys.argv[2]), epochs=100)
    print(PREFIX + json.dumps(report), flush=True)
