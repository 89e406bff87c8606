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
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
import torch
from torch import nn

from raylane import ConfigurationError, get_strategy
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


class Checks:
    """Runs each path, recording its figures and every failed expectation; a crash in one path fails only that one."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self.failures: list[str] = []

    def run(self, name: str, path: Any) -> None:
        figures: dict[str, Any] = {}
        self.summary[name] = figures
        try:
            path(figures, lambda ok, why: ok or self.failures.append(f"{name}: {why}"))
        except Exception:
            figures["crash"] = traceback.format_exc()
            self.failures.append(f"{name}: crashed ({traceback.format_exc(limit=0).strip()})")


def nccl_one_worker(tmp: Path, figures: dict[str, Any], expect: Any) -> None:
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


def gloo_shared_gpu_vs_cpu(tmp: Path, figures: dict[str, Any], expect: Any) -> None:
    torch.manual_seed(0)
    gpu_model, cpu_model = MLP(), MLP()
    cpu_model.load_state_dict(gpu_model.state_dict())
    _, gpu_seconds = fit(tmp, gpu_model, workers=2, use_gpu=True, gpus_per_worker=0.5, process_group_backend="gloo")
    _, cpu_seconds = fit(tmp, cpu_model, workers=2)
    differences = [(gpu_model.state_dict()[k] - v).abs().max().item() for k, v in cpu_model.state_dict().items()]
    figures.update(fit_s=[round(gpu_seconds, 2), round(cpu_seconds, 2)], max_weight_diff=max(differences))
    expect(max(differences) < 1e-5, f"GPU and CPU runs differ by {max(differences)}")


def offload_bf16_checkpointing(tmp: Path, figures: dict[str, Any], expect: Any) -> None:
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


def nccl_shared_gpu_rejected(tmp: Path, figures: dict[str, Any], expect: Any) -> None:
    started = time.monotonic()
    try:
        fit(tmp, MLP(), workers=2, use_gpu=True, gpus_per_worker=0.5, collective_timeout=60)
    except ConfigurationError as err:
        figures.update(outcome="ConfigurationError", message_head=str(err)[:300])
    except Exception as err:
        figures.update(outcome=type(err).__name__, message_head=str(err)[:300])
    else:
        figures["outcome"] = "trained"
    figures["seconds"] = round(time.monotonic() - started, 1)
    expect(figures["outcome"] == "ConfigurationError", f"NCCL on a shared GPU must be rejected: {figures['outcome']}")
    expect(figures["seconds"] < 30, f"the rejection took {figures['seconds']} s")


def main() -> Checks:
    checks = Checks()
    checks.summary.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0))
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp_name:
        for name, path in [
            ("A_nccl_one_worker", nccl_one_worker),
            ("B_gloo_shared_gpu_vs_cpu", gloo_shared_gpu_vs_cpu),
            ("C_offload_bf16_checkpointing", offload_bf16_checkpointing),
            ("D_nccl_shared_gpu", nccl_shared_gpu_rejected),
        ]:
            directory = Path(tmp_name) / name
            directory.mkdir()
            checks.run(name, lambda figures, expect, path=path, directory=directory: path(directory, figures, expect))
    return checks


if __name__ == "__main__":
    try:
        checks = main()
        result, failures = checks.summary, checks.failures
    except Exception:  # no GPU, no Ray: nothing was checked
        result, failures = {"crash": traceback.format_exc()}, ["the checks could not start"]
    result["failures"] = failures
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    print("FAILED: " + "; ".join(failures) if failures else "all fsdp GPU checks passed", file=sys.stderr)
    sys.exit(1 if failures else 0)
