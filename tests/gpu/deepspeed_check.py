"""GPU check of the deepspeed backend for a machine with one CUDA GPU (not collected by pytest; run by hand or on a lent
GPU machine, with DeepSpeed installed: see backends/deepspeed/README.md).

python tests/gpu/deepspeed_check.py [out.json]

A) ZeRO-2, one worker on the GPU over NCCL: fit with a validation loader, then test and predict on the warm worker;
   the weights come back to the driver and match the same run on CPU workers (gloo) within 1e-4.
B) ZeRO-3 likewise, and its checkpoint directory resumes a second fit.
C) ZeRO-3 with optimizer and parameter offload to CPU memory trains (DeepSpeed's CPU Adam is compiled on first use).
D) two workers sharing the GPU (gpus_per_worker=0.5) are refused on the driver: NCCL cannot put two ranks on one device.

Exits non-zero when any of them fails, after running the others; the JSON summary says which failed and why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from check_runner import Check, Expect, expect_refused_before_start, run_checks
from pytorch_lightning.callbacks import ModelCheckpoint

from raylane import get_strategy
from raylane.testing import ClassifierModel, make_loader
from raylane_deepspeed.checkpoints import consolidated_state_dict

QUIET: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}


def trainer(
    root: Path, gpu: bool, max_epochs: int = 2, callbacks: list[Any] | None = None, **options: Any
) -> pl.Trainer:
    strategy = get_strategy("deepspeed", workers=1, use_gpu=gpu, idle_timeout=5, **options)
    return pl.Trainer(
        strategy=strategy, callbacks=callbacks, max_epochs=max_epochs, default_root_dir=str(root), **QUIET
    )


def fit_on(root: Path, gpu: bool, **options: Any) -> tuple[pl.Trainer, ClassifierModel]:
    torch.manual_seed(3)
    model = ClassifierModel(optimizer="adam", report_dir=str(root), report_env=("CUDA_VISIBLE_DEVICES",))
    run = trainer(root, gpu, **options)
    run.fit(model, make_loader(8), make_loader(8))
    return run, model


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[name].float() - b[name].float()).abs().max()) for name in a)


def check_stage(tmp: Path, stage: int) -> dict[str, Any]:
    (tmp / "gpu").mkdir()
    (tmp / "cpu").mkdir()
    checkpoint = ModelCheckpoint(dirpath=str(tmp / "gpu" / "ckpt"), save_top_k=-1)
    run, on_gpu = fit_on(tmp / "gpu", True, stage=stage, callbacks=[checkpoint])
    report = json.loads((tmp / "gpu" / "fit-rank0.json").read_text())
    assert report["device"].startswith("cuda"), report
    assert on_gpu.layer.weight.device.type == "cpu", "the driver's model stays on the CPU"
    [tested] = run.test(on_gpu, make_loader(8))
    predictions = run.predict(on_gpu, make_loader(8, samples=20))
    assert sum(len(p) for p in predictions) == 20
    _, on_cpu = fit_on(tmp / "cpu", False, stage=stage)
    difference = max_difference(on_gpu.state_dict(), on_cpu.state_dict())
    assert difference < 1e-4, f"GPU and CPU runs differ by {difference}"
    directory = Path(run.checkpoint_callback.best_model_path)  # type: ignore[union-attr]
    saved = max_difference(consolidated_state_dict(directory), on_gpu.state_dict())
    assert saved < 1e-6, f"checkpoint and driver weights differ by {saved}"
    resumed = ClassifierModel(optimizer="adam")
    trainer(tmp / "resumed", True, stage=stage, max_epochs=3).fit(
        resumed, make_loader(8), make_loader(8), ckpt_path=str(directory)
    )
    return {"test_loss": tested["test_loss"], "gpu_vs_cpu": difference, "checkpoint": str(directory), "env": report}


def check_offload(tmp: Path) -> dict[str, Any]:
    run, model = fit_on(tmp, True, stage=3, offload_optimizer=True, offload_parameters=True)
    assert run.state.finished and run.global_step == 16
    return {"global_step": run.global_step, "weight_sum": float(model.layer.weight.sum())}


def check_shared_gpu_refused(tmp: Path, figures: dict[str, Any], expect: Expect) -> None:
    attempt = partial(get_strategy, "deepspeed", workers=2, use_gpu=True, gpus_per_worker=0.5)
    expect_refused_before_start(attempt, figures, expect)


def recorded(check: Callable[[Path], dict[str, Any]]) -> Check:
    """A check that asserts and returns its figures, in the runner's form (a failed assert fails the check)."""
    return lambda tmp, figures, expect: figures.update(check(tmp))


if __name__ == "__main__":
    run_checks(
        "deepspeed",
        {
            "A_zero2_nccl": recorded(partial(check_stage, stage=2)),
            "B_zero3_nccl": recorded(partial(check_stage, stage=3)),
            "C_zero3_offload": recorded(check_offload),
            "D_shared_gpu_refused": check_shared_gpu_refused,
        },
    )
