"""GPU check for a machine with one CUDA GPU (not collected by pytest; run by hand or on a lent GPU machine).

python tests/gpu/gpu_smoke.py [out.json]

A) one worker on the GPU over NCCL: fit/test/predict, device and CUDA_VISIBLE_DEVICES as Ray assigned them;
B) two workers sharing the GPU (gpus_per_worker=0.5) over gloo, against the same run on CPUs;
C) two workers sharing the GPU over NCCL, which NCCL refuses: it must fail with an error, not hang.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
import torch

from raylane import get_strategy
from raylane.testing import ClassifierModel, make_loader


def fit(tmp: Path, model: ClassifierModel, **options: Any) -> tuple[pl.Trainer, float]:
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", **options),
        max_epochs=2,
        default_root_dir=str(tmp),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.monotonic()
    trainer.fit(model, make_loader(8), make_loader(8))
    return trainer, time.monotonic() - started


def reports(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("fit-rank*.json"))]


def main() -> dict[str, Any]:
    summary: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "a").mkdir()
        model = ClassifierModel(report_dir=str(tmp / "a"), report_env=("CUDA_VISIBLE_DEVICES",))
        trainer, seconds = fit(tmp / "a", model, workers=1, use_gpu=True)
        [tested] = trainer.test(model, make_loader(8))
        predictions = trainer.predict(model, make_loader(8, samples=20))
        summary["A_nccl_one_worker"] = {
            "fit_s": round(seconds, 2),
            "reports": reports(tmp / "a"),
            "driver_weights_device": str(model.layer.weight.device),
            "global_step": trainer.global_step,
            "test_loss": tested["test_loss"],
            "predictions": [list(p.shape) for p in predictions],
        }

        torch.manual_seed(0)
        gpu_model, cpu_model = ClassifierModel(report_dir=str(tmp)), ClassifierModel()
        cpu_model.load_state_dict(gpu_model.state_dict())
        _, gpu_seconds = fit(tmp, gpu_model, workers=2, use_gpu=True, gpus_per_worker=0.5, process_group_backend="gloo")
        _, cpu_seconds = fit(tmp, cpu_model, workers=2)
        summary["B_gloo_shared_gpu_vs_cpu"] = {
            "fit_s": [round(gpu_seconds, 2), round(cpu_seconds, 2)],
            "devices": [r["device"] for r in reports(tmp)],
            "max_weight_diff": float((gpu_model.layer.weight - cpu_model.layer.weight).abs().max()),
        }

        started = time.monotonic()
        try:
            fit(tmp, ClassifierModel(), workers=2, use_gpu=True, gpus_per_worker=0.5, collective_timeout=60)
            summary["C_nccl_shared_gpu"] = {"outcome": "trained"}
        except Exception as err:  # the point: an error, quickly
            summary["C_nccl_shared_gpu"] = {
                "outcome": type(err).__name__,
                "seconds": round(time.monotonic() - started, 1),
                "message_head": str(err)[:300],
                "nccl_lines": [line for line in str(err).splitlines() if "NCCL" in line or "nccl" in line][:5],
            }
    return summary


if __name__ == "__main__":
    try:
        result = main()
    except Exception:
        result = {"crash": traceback.format_exc()}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
