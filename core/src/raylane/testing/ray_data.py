"""A generated Ray Dataset and a model that records which rows each rank saw, for tests of ``raylane.data``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylane.testing.models import ClassifierModel


def make_ray_dataset(rows: int = 64, features: int = 8, classes: int = 3) -> Any:
    """``rows`` rows of ``{"id", "x", "y"}`` computed from the id in Ray Data's tasks (nothing held on the driver)."""
    import ray.data

    def add_features(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        x = np.stack([np.sin(ids * (j + 1) * 0.37) for j in range(features)], axis=1).astype(np.float32)
        return {"id": ids, "x": x, "y": ids % classes}

    return ray.data.range(rows).map_batches(add_features)


class RowRecordingModel(ClassifierModel):
    """``ClassifierModel`` on dict batches (``x``, ``y``, ``id``). With ``report_dir``, every rank writes the ids it
    trained on, per epoch, and those it validated on, per validation run, as JSON; predict returns the ids with the
    outputs, so predictions can be joined back to rows."""

    def __init__(self, report_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(report_dir=report_dir, **kwargs)
        self._seen: dict[str, list[int]] = {}
        self._validation_runs = 0

    def _inputs_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["x"], batch["y"]

    def on_train_start(self) -> None:
        return None  # the parent's report reads a torch sampler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._seen.setdefault(f"fit-epoch{self.current_epoch}", []).extend(batch["id"].tolist())
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self._seen.setdefault(f"val-run{self._validation_runs}", []).extend(batch["id"].tolist())
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._validation_runs += 1

    def on_fit_end(self) -> None:
        if self.hparams.report_dir is not None:
            path = Path(self.hparams.report_dir) / f"rows-rank{self.global_rank}.json"
            path.write_text(json.dumps({"device": str(self.device), **self._seen}))

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"id": batch["id"], "output": self(batch["x"])}


def rows_seen(report_dir: Path | str) -> list[dict[str, Any]]:
    """Every rank's report of :class:`RowRecordingModel`, in rank order."""
    paths = sorted(Path(report_dir).glob("rows-rank*.json"), key=lambda p: int(p.stem.removeprefix("rows-rank")))
    return [json.loads(path.read_text()) for path in paths]
