"""GPU check for a machine with one CUDA GPU (not collected by pytest; run by hand or on a lent GPU machine).

python tests/gpu/gpu_smoke.py [out.json]

Exits non-zero when any check fails (each path runs even when an earlier one failed); the JSON summary says which
check failed and why.

A) one worker on the GPU over NCCL: fit/test/predict, device and CUDA_VISIBLE_DEVICES as Ray assigned them;
B) two workers sharing the GPU (gpus_per_worker=0.5) over gloo, against the same run on CPUs;
C) two workers sharing the GPU over NCCL, which NCCL refuses: it must fail with an error, not hang.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from check_runner import Expect, expect_refused_before_start, run_checks

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


def nccl_one_worker(tmp: Path, figures: dict[str, Any], expect: Expect) -> None:
    model = ClassifierModel(report_dir=str(tmp), report_env=("CUDA_VISIBLE_DEVICES",))
    trainer, seconds = fit(tmp, model, workers=1, use_gpu=True)
    [tested] = trainer.test(model, make_loader(8))
    predictions = trainer.predict(model, make_loader(8, samples=20))
    figures.update(
        fit_s=round(seconds, 2),
        reports=reports(tmp),
        driver_weights_device=str(model.layer.weight.device),
        global_step=trainer.global_step,
        test_loss=tested["test_loss"],
        predictions=[list(p.shape) for p in predictions],
    )
    [report] = figures["reports"]
    expect(report["device"] == "cuda:0", f"the worker trained on {report['device']}, not cuda:0")
    expect(bool(report["env"]["CUDA_VISIBLE_DEVICES"]), "the worker saw no CUDA_VISIBLE_DEVICES")
    expect(figures["driver_weights_device"] == "cpu", "the weights did not come back to the driver's CPU")
    expect(trainer.global_step == 16, f"64 samples in batches of 8 for 2 epochs is 16 steps, not {trainer.global_step}")
    expect(math.isfinite(tested["test_loss"]), f"test loss {tested['test_loss']}")
    expect(sum(p.shape[0] for p in predictions) == 20, f"predictions for 20 samples: {figures['predictions']}")


def gloo_shared_gpu_vs_cpu(tmp: Path, figures: dict[str, Any], expect: Expect) -> None:
    torch.manual_seed(0)
    gpu_model, cpu_model = ClassifierModel(report_dir=str(tmp)), ClassifierModel()
    cpu_model.load_state_dict(gpu_model.state_dict())
    _, gpu_seconds = fit(tmp, gpu_model, workers=2, use_gpu=True, gpus_per_worker=0.5, process_group_backend="gloo")
    _, cpu_seconds = fit(tmp, cpu_model, workers=2)
    figures.update(
        fit_s=[round(gpu_seconds, 2), round(cpu_seconds, 2)],
        devices=[r["device"] for r in reports(tmp)],
        max_weight_diff=float((gpu_model.layer.weight - cpu_model.layer.weight).abs().max()),
    )
    expect(figures["devices"] == ["cuda:0", "cuda:0"], f"both workers on the one GPU: {figures['devices']}")
    expect(figures["max_weight_diff"] < 1e-5, f"GPU and CPU runs differ by {figures['max_weight_diff']}")


def nccl_shared_gpu_rejected(tmp: Path, figures: dict[str, Any], expect: Expect) -> None:
    attempt = partial(fit, tmp, ClassifierModel(), workers=2, use_gpu=True, gpus_per_worker=0.5, collective_timeout=60)
    expect_refused_before_start(attempt, figures, expect)


if __name__ == "__main__":
    run_checks(
        "ddp",
        {
            "A_nccl_one_worker": nccl_one_worker,
            "B_gloo_shared_gpu_vs_cpu": gloo_shared_gpu_vs_cpu,
            "C_nccl_shared_gpu": nccl_shared_gpu_rejected,
        },
    )
