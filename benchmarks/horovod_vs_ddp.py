"""Time the same training with raylane's horovod and ddp backends on 2 Ray workers.

    python benchmarks/horovod_vs_ddp.py --repeats 3 [--json horovod_vs_ddp.json]

Needs raylane-ddp, raylane-horovod and Horovod itself (``python -m raylane_horovod.build_horovod --install``). Both
backends train the same MLP from the same seed on the same generated data with the same global batch, split over 2
workers; the runs alternate between the backends, and medians over ``--repeats`` are reported. See README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any

import pytorch_lightning as pl
import ray
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

BACKENDS = ("horovod", "ddp")
WORKERS = 2
FEATURES, CLASSES = 64, 10
LOOP_METRIC = "train_loop_s"


@dataclass(frozen=True)
class Workload:
    samples: int
    epochs: int
    batch_size: int  # global, per optimizer step; each worker gets batch_size / WORKERS
    hidden: int
    seed: int = 0


class MLP(pl.LightningModule):
    def __init__(self, hidden: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)
        )

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class LoopTimer(pl.Callback):
    """Rank 0's seconds from ``on_train_start`` to ``on_train_end``: training without starting the workers."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics[LOOP_METRIC] = torch.tensor(time.perf_counter() - self.start)


def dataset(workload: Workload) -> TensorDataset:
    """Gaussian clusters, one per class: learnable, and the same on every process from the same seed."""
    generator = torch.Generator().manual_seed(workload.seed)
    centres = torch.randn(CLASSES, FEATURES, generator=generator)
    labels = torch.randint(CLASSES, (workload.samples,), generator=generator)
    return TensorDataset(centres[labels] + 2.0 * torch.randn(workload.samples, FEATURES, generator=generator), labels)


def run_once(backend: str, workload: Workload, root: str) -> dict[str, float]:
    from raylane import get_strategy

    torch.manual_seed(workload.seed)
    model = MLP(workload.hidden)
    strategy = get_strategy(backend, workers=WORKERS, idle_timeout=0)  # released at once: every run starts workers
    trainer = pl.Trainer(
        strategy=strategy,
        max_epochs=workload.epochs,
        default_root_dir=root,
        callbacks=[LoopTimer()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    loader = DataLoader(dataset(workload), batch_size=workload.batch_size // WORKERS)
    started = time.perf_counter()
    trainer.fit(model, loader)
    fit_s = time.perf_counter() - started
    return {
        "fit_s": fit_s,
        "loop_s": float(trainer.callback_metrics[LOOP_METRIC]),
        "samples_per_s": workload.samples * workload.epochs / fit_s,
        "train_loss": float(trainer.callback_metrics["train_loss"]),
    }


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    medians = {
        backend: {f"median_{key}": median(run[key] for run in results) for key in results[0]}
        for backend, results in runs.items()
    }
    horovod, ddp = medians["horovod"], medians["ddp"]
    ratios = {
        "fit_time": horovod["median_fit_s"] / ddp["median_fit_s"],
        "samples_per_s": horovod["median_samples_per_s"] / ddp["median_samples_per_s"],
        "loop_time": horovod["median_loop_s"] / ddp["median_loop_s"],
    }
    return {"medians": medians, "horovod/ddp": ratios}


def load_average() -> float:
    return os.getloadavg()[0]


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'backend':<9} {'fit s':>8} {'loop s':>8} {'overhead s':>11} {'samples/s':>10} {'final loss':>11}"]
    for backend, values in summary["medians"].items():
        overhead = values["median_fit_s"] - values["median_loop_s"]
        lines.append(
            f"{backend:<9} {values['median_fit_s']:>8.2f} {values['median_loop_s']:>8.2f} {overhead:>11.2f} "
            f"{values['median_samples_per_s']:>10.0f} {values['median_train_loss']:>11.3f}"
        )
    ratios = summary["horovod/ddp"]
    lines.append(
        f"horovod/ddp: fit time x{ratios['fit_time']:.2f}, samples/s x{ratios['samples_per_s']:.2f}, "
        f"loop time x{ratios['loop_time']:.2f} (fit-time ratio above 1: horovod is slower)"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend; medians are reported (default: 3)")
    parser.add_argument("--samples", type=int, default=40_000, help="generated training samples (default: 40000)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch per optimizer step (default: 256)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the MLP's two hidden layers (default: 1024)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.batch_size % WORKERS:
        parser.error(f"--batch-size must split evenly over {WORKERS} workers")
    return args


def check_backends() -> str | None:
    from raylane import RaylaneError
    from raylane.registry import backend_host

    for backend in BACKENDS:
        try:
            backend_host(backend).strategy_class()
        except RaylaneError as err:
            return f"backend {backend!r} is not usable here: {err}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_backends()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    workload = Workload(args.samples, args.epochs, args.batch_size, args.hidden)
    load_at_start = load_average()
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level=logging.WARNING)
    runs: dict[str, list[dict[str, float]]] = {backend: [] for backend in BACKENDS}
    with tempfile.TemporaryDirectory(prefix="horovod_vs_ddp_") as root:
        for repeat in range(args.repeats):
            # Alternate, so a change in the machine's load spreads over both backends.
            for backend in BACKENDS if repeat % 2 == 0 else reversed(BACKENDS):
                result = run_once(backend, workload, root)
                runs[backend].append(result)
                print(
                    f"[{repeat + 1}/{args.repeats}] {backend}: fit {result['fit_s']:.2f} s, "
                    f"loop {result['loop_s']:.2f} s, {result['samples_per_s']:.0f} samples/s, "
                    f"loss {result['train_loss']:.3f}",
                    flush=True,
                )
    ray.shutdown()
    summary = summarise(runs)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1min": {"start": load_at_start, "end": load_average()},
            **{name: metadata.version(name) for name in ("torch", "pytorch-lightning", "ray", "horovod")},
        },
        "workload": {**asdict(workload), "workers": WORKERS},
        "repeats": args.repeats,
        **summary,
        "runs": runs,
    }
    print(format_table(summary))
    load_at_end = report["machine"]["load_average_1min"]["end"]
    print(f"load average (1 min): {load_at_start:.2f} at start, {load_at_end:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
