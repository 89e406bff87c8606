"""Memory and speed of the fsdp backend against the ddp backend on the same model, for N = 1, 2 and 4 workers.

    python benchmarks/fsdp_memory.py --repeats 2 [--json fsdp.json]

Per worker: the bytes of parameters, of gradients (when the optimizer steps) and of optimizer state it holds (its
shard under FSDP: the local part of each DTensor), and its peak RSS (``ru_maxrss``). Per run: training throughput
(samples/s over rank 0's training loop, start-up excluded). Each rank all-gathers its figures at the end of fit and
rank 0 logs them as metrics, which raylane brings back to the driver. The target for FSDP is at most 1/N + 10% of
ddp's parameter + gradient + optimizer-state bytes per worker at N = 2 and 4. Needs raylane-ddp and raylane-fsdp.
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
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import pytorch_lightning as pl
import ray
import torch
from memory_workload import QUIET, SyntheticData, WideMLP

from raylane import get_strategy

BACKENDS = ("ddp", "fsdp")
FIGURES = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_rss_bytes", "loop_s")


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes this process holds of these tensors: a DTensor's local shard, a plain tensor whole."""
    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            total += local.numel() * local.element_size()
    return total


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
        held = local_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)
        self.grad_bytes = max(self.grad_bytes, held)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop_s = time.perf_counter() - self.start
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        state = trainer.optimizers[0].state
        mine = [
            local_bytes(pl_module.parameters()),
            self.grad_bytes,
            local_bytes(value for param_state in state.values() for value in param_state.values()),
            peak_rss,
            loop_s,
        ]
        every_rank = trainer.strategy.all_gather(torch.tensor(mine, dtype=torch.float64)).reshape(-1, len(FIGURES))
        for rank, figures in enumerate(every_rank):
            for name, value in zip(FIGURES, figures):
                trainer.callback_metrics[f"bench/rank{rank}/{name}"] = value


def run_once(backend: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = WideMLP(args.width, args.layers)
    data = SyntheticData(args.samples, args.width, args.batch_size // workers)
    # Fractional CPUs when the workers outnumber the cores, so 4 workers fit a 2-core machine.
    cpus = min(1.0, ray.cluster_resources()["CPU"] / workers)
    trainer = pl.Trainer(
        # idle_timeout=0: the workers stop after fit, so the next run starts (and measures) fresh processes.
        strategy=get_strategy(backend, workers=workers, cpus_per_worker=cpus, idle_timeout=0),
        max_epochs=1,
        callbacks=[WorkerFigures()],
        **QUIET,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - started
    metrics = trainer.callback_metrics
    ranks = [{name: float(metrics[f"bench/rank{rank}/{name}"]) for name in FIGURES} for rank in range(workers)]
    return {"fit_s": fit_s, "samples_per_s": args.samples / ranks[0]["loop_s"], "workers": ranks}


def state_bytes(worker: dict[str, float]) -> float:
    return worker["param_bytes"] + worker["grad_bytes"] + worker["optimizer_state_bytes"]


def summarise(runs: dict[tuple[str, int], list[dict[str, Any]]]) -> dict[str, Any]:
    configs: dict[str, Any] = {}
    for (backend, workers), results in runs.items():
        configs[f"{backend}/N={workers}"] = {
            "backend": backend,
            "workers": workers,
            "samples_per_s": median(r["samples_per_s"] for r in results),
            "ranks": [
                {name: median(r["workers"][rank][name] for r in results) for name in FIGURES} for rank in range(workers)
            ],
        }
    ratios = {}
    for name, figures in configs.items():
        base = configs.get(f"ddp/N={figures['workers']}")
        if figures["backend"] == "ddp" or base is None:
            continue
        worst = max(state_bytes(rank) for rank in figures["ranks"])
        base_worst = max(state_bytes(rank) for rank in base["ranks"])
        ratios[name] = {
            "state_bytes/ddp (worst worker)": worst / base_worst,
            "target": 1 / figures["workers"] + 0.1 if figures["workers"] > 1 else 1.0,
            "peak_rss/ddp (worst worker)": max(r["peak_rss_bytes"] for r in figures["ranks"])
            / max(r["peak_rss_bytes"] for r in base["ranks"]),
            "samples_per_s/ddp": figures["samples_per_s"] / base["samples_per_s"],
        }
    return {"configs": configs, "ratios": ratios}


def format_table(report: dict[str, Any]) -> str:
    mib = 2**20
    head = f"{'config':<10} {'rank':>4} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} {'sum MiB':>9}"
    lines = [f"{head} {'peak RSS MiB':>13} {'samples/s':>10}"]
    for name, figures in report["configs"].items():
        for rank, worker in enumerate(figures["ranks"]):
            speed = f"{figures['samples_per_s']:.1f}" if rank == 0 else ""
            lines.append(
                f"{name:<10} {rank:>4} {worker['param_bytes'] / mib:>11.1f} {worker['grad_bytes'] / mib:>10.1f} "
                f"{worker['optimizer_state_bytes'] / mib:>10.1f} {state_bytes(worker) / mib:>9.1f} "
                f"{worker['peak_rss_bytes'] / mib:>13.1f} {speed:>10}"
            )
    lines.append("")
    for name, ratios in report["ratios"].items():
        lines.append(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in ratios.items()))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration; medians are reported")
    parser.add_argument("--width", type=int, default=1024, help="width of each square layer (default: 1024)")
    parser.add_argument("--layers", type=int, default=8, help="square layers (default: 8, about 8.4M parameters)")
    parser.add_argument("--samples", type=int, default=1024, help="training samples (default: 1024, one epoch)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch per step (default: 64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default: 1 2 4)")
    parser.add_argument("--json", type=Path, help="also write the full results to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(args.repeats):  # round-robin, so a slow spell of the machine hits every configuration alike
        for workers in args.workers:
            for backend in BACKENDS:
                runs.setdefault((backend, workers), []).append(run_once(backend, workers, args))
    report = summarise(runs)
    report["setup"] = {
        "width": args.width,
        "layers": args.layers,
        "parameters": sum(p.numel() for p in WideMLP(args.width, args.layers).parameters()),
        "samples": args.samples,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    print(format_table(report))
    print(f"\nload average at the end: {os.getloadavg()}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
