"""GPU check of the fsdp backend on a machine with one CUDA GPU (not collected by pytest; run by hand or on a lent GPU
machine, with raylane-fsdp installed).

python tests/gpu/fsdp_check.py [out.json]

Exits non-zero when any check fails (each path runs even when an earlier one failed); the JSON summary says which
check failed and why.

A) one worker on the GPU over NCCL: fit/test/predict, the sharded checkpoint directory, the full weights back on the
   driver's CPU in float32;
B) two workers sharing the GPU (gpus_per_worker=0.5) over gloo, against the same run on two CPU workers (1e-5);
C) one NCCL worker with mixed_precision="bf16", cpu_offload=True and activation checkpointing: the sharded
   parameters live on the CPU during training, compute runs in bf16 on the GPU, the loss stays finite;
D) two workers sharing the GPU over NCCL, which NCCL refuses: rejected before any actor starts.
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
from torch import nn

from raylane import get_strategy
from raylane.testing import ClassifierModel, make_loader


class MLP(ClassifierModel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


class WhereTheShardsLive(pl.Callback):
    """Rank 0 records the device and dtype of its parameter shards and of one forward's output during training."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_rank != 0 or Path(self.path).exists():
            return
        shard = next(pl_module.parameters())
        with torch.no_grad():  # one worker (a forward on rank 0 alone would wait for the others' all-gather)
            output = pl_module(torch.randn(2, 8, device=pl_module.device))
        local = getattr(shard, "to_local", lambda: shard)()
        report = {"shard_device": str(local.device), "shard_dtype": str(shard.dtype)}
        report.update(output_dtype=str(output.dtype), output_device=str(output.device))
        Path(self.path).write_text(json.dumps(report))


def fit(
    tmp: Path, model: ClassifierModel, callbacks: list[pl.Callback] = (), **options: Any
) -> tuple[pl.Trainer, float]:
    trainer = pl.Trainer(
        strategy=get_strategy("fsdp", min_wrap_params=1000, **options),
        max_epochs=2,
        default_root_dir=str(tmp),
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.monotonic()
    trainer.fit(model, make_loader(8), make_loader(8))
    return trainer, time.monotonic() - started


def nccl_one_worker(tmp: Path, figures: dict[str, Any], expect: Expect) -> None:
    model = MLP(report_dir=str(tmp))
    trainer, seconds = fit(tmp, model, workers=1, use_gpu=True)
    [tested] = trainer.test(model, make_loader(8))
    predictions = trainer.predict(model, make_loader(8, samples=20))
    [report] = [json.loads(p.read_text()) for p in tmp.glob("fit-rank*.json")]
    best = Path(trainer.checkpoint_callback.best_model_path)
    figures.update(
        fit_s=round(seconds, 2),
        device=report["device"],
        driver_weights=[str(model.layer[0].weight.device), str(model.layer[0].weight.dtype)],
        checkpoint=sorted(p.name for p in best.iterdir()) if best.is_dir() else str(best),
        test_loss=tested["test_loss"],
        predictions=sum(p.shape[0] for p in predictions),
    )
    expect(report["device"] == "cuda:0", f"the worker trained on {report['device']}, not cuda:0")
    expect(figures["driver_weights"] == ["cpu", "torch.float32"], f"driver weights: {figures['driver_weights']}")
    expect(best.is_dir() and (best / "meta.pt").is_file(), f"a sharded checkpoint directory: {figures['checkpoint']}")
    expect(math.isfinite(tested["test_loss"]), f"test loss {tested['test_loss']}")
    expect(figures["predictions"] == 20, f"predictions for 20 samples, got {figures['predictions']}")


def gloo_shared_gpu_vs_cpu(tmp: Path, figures: dict[str, Any], expect: Expect) -> None:
    torch.manual_seed(0)
    gpu_model, cpu_model = MLP(), MLP()
    cpu_model.load_state_dict(gpu_model.state_dict())
    _, gpu_seconds = fit(tmp, gpu_model, workers=2, use_gpu=True, gpus_per_worker=0.5, process_group_backend="gloo")
    _, cpu_seconds = fit(tmp, cpu_model, workers=2)
    differences = [(gpu_model.state_dict()[k] - v).abs().max().item() for k, v in cpu_model.state_dict().items()]
    figures.update(fit_s=[round(gpu_seconds, 2), round(cpu_seconds, 2)], max_weight_diff=max(differences))
    expect(max(differences) < 1e-5, f"GPU and CPU runs differ by {max(differences)}")


def offload_bf16_checkpointing(tmp: Path, figures: dict[str, Any], expect: Expect) -> None:
    model = MLP()
    report_path = tmp / "shards.json"
    options = {"mixed_precision": "bf16", "cpu_offload": True, "activation_checkpointing": nn.Linear}
    trainer, seconds = fit(tmp, model, [WhereTheShardsLive(str(report_path))], workers=1, use_gpu=True, **options)
    report = json.loads(report_path.read_text())
    loss = float(trainer.callback_metrics["train_loss"])
    figures.update(fit_s=round(seconds, 2), train_loss=loss, **report)
    expect(report["shard_device"] == "cpu", f"cpu_offload keeps the shards on the CPU, found {report['shard_device']}")
    expect(report["shard_dtype"] == "torch.float32", f"sharded parameters stay float32: {report['shard_dtype']}")
    expect(report["output_dtype"] == "torch.bfloat16", f"bf16 compute, output {report['output_dtype']}")
    expect(report["output_device"].startswith("cuda"), f"compute on the GPU, output on {report['output_device']}")
    expect(math.isfinite(loss), f"train loss {loss}")


def nccl_shared_gpu_rejected(tmp: Path, figures: dict[str, Any], expect: Expect) -> None:
    attempt = partial(fit, tmp, MLP(), workers=2, use_gpu=True, gpus_per_worker=0.5, collective_timeout=60)
    expect_refused_before_start(attempt, figures, expect)


if __name__ == "__main__":
    run_checks(
        "fsdp",
        {
            "A_nccl_one_worker": nccl_one_worker,
            "B_gloo_shared_gpu_vs_cpu": gloo_shared_gpu_vs_cpu,
            "C_offload_bf16_checkpointing": offload_bf16_checkpointing,
            "D_nccl_shared_gpu": nccl_shared_gpu_rejected,
        },
    )
