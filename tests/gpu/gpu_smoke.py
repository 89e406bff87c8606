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
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
import torch

from raylane import ConfigurationError, get_strategy
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


def gloo_shared_gpu_vs_cpu(tmp: Path, figures: dict[str, Any], expect: Any) -> None:
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


def nccl_shared_gpu_rejected(tmp: Path, figures: dict[str, Any], expect: Any) -> None:
    started = time.monotonic()
    try:
        fit(tmp, ClassifierModel(), workers=2, use_gpu=True, gpus_per_worker=0.5, collective_timeout=60)
    except ConfigurationError as err:  # before any actor starts
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
            ("C_nccl_shared_gpu", nccl_shared_gpu_rejected),
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
    print("FAILED: " + "; ".join(failures) if failures else "all GPU checks passed", file=sys.stderr)
    sys.exit(1 if failures else 0)
