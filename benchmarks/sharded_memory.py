"""Memory and speed of the sharded backend against the DDP backend: a >= 20M-parameter model with Adam on 2 workers.

    python benchmarks/sharded_memory.py --repeats 3 [--json sharded.json]

Per worker: the bytes of optimizer state it holds (the tensors in its optimizer's local state: the shard, for a
sharded optimizer), the bytes of gradients it holds when the optimizer steps, and its peak RSS (``ru_maxrss``). Per
run: training throughput (samples/s over rank 0's training loop, start-up excluded). Each rank all-gathers its figures
at the end of fit and rank 0 logs them as metrics, which raylane brings back to the driver: no shared filesystem.
Configurations run round-robin; the table shows medians over ``--repeats``. Needs raylane-ddp and raylane-sharded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

import pytorch_lightning as pl
import ray
import torch
from memory_workload import QUIET, SyntheticData, WideMLP

from raylane import get_strategy
from raylane_sharded.optimizers import local_state_bytes

WORKERS = 2
CONFIGS = {
    "ddp": ("ddp", {}),
    "sharded-fairscale": ("sharded", {"engine": "fairscale"}),
    "sharded-zero": ("sharded", {"engine": "zero"}),
}
BASELINE = "ddp"
FIGURES = ("optimizer_state_bytes", "grad_bytes", "peak_rss_bytes", "loop_s")


class WorkerFigures(pl.Callback):
    """Measures each rank and relays every rank's figures through rank 0's ``callback_metrics``."""

    def __init__(self) -> None:
        self.start = 0.0
        self.grad_bytes = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # After the backward pass and its reduction: ShardedDataParallel has dropped the other ranks' gradients.
        held = sum(p.grad.numel() * p.grad.element_size() for p in pl_module.parameters() if p.grad is not None)
        self.grad_bytes = max(self.grad_bytes, held)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop_s = time.perf_counter() - self.start
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        mine = torch.tensor(
            [local_state_bytes(trainer.optimizers[0]), self.grad_bytes, peak_rss, loop_s], dtype=torch.float64
        )
        every_rank = trainer.strategy.all_gather(mine).reshape(-1, len(FIGURES))  # a collective: all ranks call it
        for rank, figures in enumerate(every_rank):
            for name, value in zip(FIGURES, figures):
                trainer.callback_metrics[f"bench/rank{rank}/{name}"] = value


def run_once(config: str, args: argparse.Namespace) -> dict[str, Any]:
    backend, options = CONFIGS[config]
    pl.seed_everything(0, verbose=False)
    model = WideMLP(args.width, args.layers)
    data = SyntheticData(args.samples, args.width, args.batch_size // WORKERS)
    trainer = pl.Trainer(
        # idle_timeout=0: the workers stop after fit, so the next run starts (and measures) fresh processes.
        strategy=get_strategy(backend, workers=WORKERS, idle_timeout=0, **options),
        max_epochs=args.epochs,
        callbacks=[WorkerFigures()],
        **QUIET,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - started
    metrics = trainer.callback_metrics
    workers = [{name: float(metrics[f"bench/rank{rank}/{name}"]) for name in FIGURES} for rank in range(WORKERS)]
    samples = args.samples * args.epochs
    return {"fit_s": fit_s, "samples_per_s": samples / workers[0]["loop_s"], "workers": workers}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    configs: dict[str, Any] = {}
    for config, results in runs.items():
        configs[config] = {
            "samples_per_s": median(r["samples_per_s"] for r in results),
            "fit_s": median(r["fit_s"] for r in results),
            "workers": [
                {name: median(r["workers"][rank][name] for r in results) for name in FIGURES} for rank in range(WORKERS)
            ],
        }
    ratios = {}
    base = configs[BASELINE]
    for config, figures in configs.items():
        if config == BASELINE:
            continue

        def worst(summary: dict[str, Any], name: str) -> float:
            return max(worker[name] for worker in summary["workers"])

        ratios[f"{config}/{BASELINE}"] = {
            "optimizer_state_bytes (worst worker)": worst(figures, "optimizer_state_bytes")
            / worst(base, "optimizer_state_bytes"),
            "grad_bytes (worst worker)": worst(figures, "grad_bytes") / worst(base, "grad_bytes"),
            "peak_rss_bytes (worst worker)": worst(figures, "peak_rss_bytes") / worst(base, "peak_rss_bytes"),
            "samples_per_s": figures["samples_per_s"] / base["samples_per_s"],
        }
    return {"configs": configs, "ratios": ratios}


def format_table(report: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"{'config':<18} {'rank':>4} {'optim state MiB':>16} {'grads MiB':>10} {'peak RSS MiB':>13} {'samples/s':>10}",
    ]
    for config, figures in report["configs"].items():
        for rank, worker in enumerate(figures["workers"]):
            speed = f"{figures['samples_per_s']:.1f}" if rank == 0 else ""
            lines.append(
                f"{config:<18} {rank:>4} {worker['optimizer_state_bytes'] / mib:>16.1f} "
                f"{worker['grad_bytes'] / mib:>10.1f} {worker['peak_rss_bytes'] / mib:>13.1f} {speed:>10}"
            )
    lines.append("")
    for name, ratios in report["ratios"].items():
        lines.append(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in ratios.items()))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration; medians are reported")
    parser.add_argument("--width", type=int, default=2048, help="width of each square layer (default: 2048)")
    parser.add_argument("--layers", type=int, default=6, help="square layers (default: 6, about 25M parameters)")
    parser.add_argument("--samples", type=int, default=2048, help="training samples per epoch (default: 2048)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default: 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch per step (default: 64)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json", type=Path, help="also write the full results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.batch_size % WORKERS:
        parser.error(f"--batch-size must split evenly over {WORKERS} workers")
    if BASELINE not in args.configs:
        parser.error(f"--configs must include the baseline {BASELINE!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parameters = sum(p.numel() for p in WideMLP(args.width, args.layers).parameters())
    print(f"model: {parameters / 1e6:.1f}M parameters, Adam, {WORKERS} workers, global batch {args.batch_size}")
    load_at_start = os.getloadavg()[0]
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level=logging.WARNING)
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in args.configs}
    try:
        # Round-robin, so a change in the machine's load spreads over every configuration.
        for repeat in range(args.repeats):
            for config in args.configs:
                result = run_once(config, args)
                runs[config].append(result)
                state = [w["optimizer_state_bytes"] / 2**20 for w in result["workers"]]
                print(
                    f"[{repeat + 1}/{args.repeats}] {config}: {result['samples_per_s']:.1f} samples/s, optimizer "
                    f"state per worker {', '.join(f'{s:.1f}' for s in state)} MiB, fit {result['fit_s']:.1f} s",
                    flush=True,
                )
    finally:
        ray.shutdown()
    report = summarise(runs)
    report["setup"] = {
        "parameters": parameters,
        "workers": WORKERS,
        **{k: v for k, v in vars(args).items() if k not in ("json", "configs")},
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        # Other processes on the cores skew throughput (not the byte counts): the 1-minute load average.
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
    }
    print()
    print(format_table(report))
    print(f"1-minute load average: {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    if args.json is not None:
        args.json.write_text(json.dumps({**report, "runs": runs}, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
