"""What the memory benchmarks share (``sharded_memory.py``, ``fsdp_memory.py``, ``deepspeed_memory.py``,
``fsdp_largest.py``): the workload (a wide MLP with Adam on generated data), the per-worker measurement, and the
summary and table. Imported by name on the workers too (raylane gives them the driver's ``sys.path``).

Each rank measures itself (:class:`WorkerFigures`); the figures are all-gathered at the end of fit and rank 0 logs
them as metrics, which raylane brings back to the driver, so no shared filesystem is needed. How a rank's state is
read depends on the engine: a :class:`StateReader` per engine (plain tensors and DTensors here).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

QUIET: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "logger": False,
    "enable_model_summary": False,
}
# What each rank reports; "master" is an engine's own full-precision copy of its parameters (DeepSpeed's ZeRO keeps
# one per partition even for a float32 model), 0 elsewhere.
FIGURES = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "master_bytes", "peak_rss_bytes", "loop_s")
STATE = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "master_bytes")
MIB = 2**20


class WideMLP(pl.LightningModule):
    """``layers`` square linear layers of ``width`` and a head: equal-sized tensors, so whole-tensor sharding (OSS)
    balances them and FSDP makes one unit of each."""

    def __init__(self, width: int, layers: int, classes: int = 10, lr: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        blocks: list[nn.Module] = []
        for _ in range(layers):
            blocks += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(inputs))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def parameter_count(width: int, layers: int, classes: int = 10) -> int:
    """WideMLP's parameters, without building it."""
    return layers * (width * width + width) + width * classes + classes


class SyntheticData(pl.LightningDataModule):
    """Generated on every worker from the same seed, so no configuration pays for shipping data."""

    def __init__(self, samples: int, width: int, batch_per_worker: int) -> None:
        super().__init__()
        self.samples, self.width, self.batch_per_worker = samples, width, batch_per_worker

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(self.samples, self.width, generator=generator)
        self.train_set = TensorDataset(inputs, torch.randint(0, 10, (self.samples,), generator=generator))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_per_worker, shuffle=True)


# -- measuring a rank -------------------------------------------------------------------------------------------------


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes this process holds of these tensors: a DTensor's local shard, a plain tensor whole."""
    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            total += local.numel() * local.element_size()
    return total


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind these tensors: views into one flat buffer (as ZeRO keeps its partitions)
    count that buffer once, whole."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class StateReader:
    """How one rank's parameter, gradient and optimizer-state bytes are read: here, for engines that keep them as
    plain tensors or DTensors on the module and in ``trainer.optimizers[0].state`` (ddp, fsdp). Engines that keep
    their own buffers subclass it."""

    def param_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        return local_bytes(module.parameters())

    def grad_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        """Called when the optimizer is about to step: after the backward pass and the gradients' reduction."""
        return local_bytes(p.grad for p in module.parameters() if p.grad is not None)

    def optimizer_state_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        state = trainer.optimizers[0].state
        return local_bytes(value for param_state in state.values() for value in param_state.values())

    def master_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        return 0


class WorkerFigures(pl.Callback):
    """Measures each rank with ``reader`` and relays every rank's figures through rank 0's ``callback_metrics``.

    Peak RSS is the kernel's high-water mark of the process (``ru_maxrss``): every worker is a fresh process
    (``idle_timeout=0``), so it covers that process from its start to the end of training. Throughput is over rank
    0's training loop (start-up excluded).
    """

    def __init__(self, reader: StateReader | None = None) -> None:
        self.reader = reader or StateReader()
        self.start = 0.0
        self.grad_bytes = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.grad_bytes = max(self.grad_bytes, self.reader.grad_bytes(trainer, pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop_s = time.perf_counter() - self.start
        mine = {
            "param_bytes": self.reader.param_bytes(trainer, pl_module),
            "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.reader.optimizer_state_bytes(trainer, pl_module),
            "master_bytes": self.reader.master_bytes(trainer, pl_module),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            "loop_s": loop_s,
        }
        figures = torch.tensor([float(mine[name]) for name in FIGURES], dtype=torch.float64)
        every_rank = trainer.strategy.all_gather(figures).reshape(-1, len(FIGURES))  # a collective: all ranks call it
        for rank, values in enumerate(every_rank):
            for name, value in zip(FIGURES, values):
                trainer.callback_metrics[f"bench/rank{rank}/{name}"] = value


def fit_and_measure(
    strategy: Any,
    model: pl.LightningModule,
    data: pl.LightningDataModule,
    reader: StateReader | None = None,
    **flags: Any,
) -> dict[str, Any]:
    """One ``fit``: its wall time, samples/s over rank 0's loop, and every rank's figures."""
    trainer = pl.Trainer(strategy=strategy, callbacks=[WorkerFigures(reader)], **{**QUIET, **flags})
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - started
    metrics = trainer.callback_metrics
    workers = strategy.launch_options.workers
    ranks = [{name: float(metrics[f"bench/rank{rank}/{name}"]) for name in FIGURES} for rank in range(workers)]
    samples = trainer.global_step * data.batch_per_worker * workers  # type: ignore[attr-defined]
    return {"fit_s": fit_s, "samples_per_s": samples / ranks[0]["loop_s"], "ranks": ranks}


# -- the report --------------------------------------------------------------------------------------------------------


def state_bytes(rank: Mapping[str, float]) -> float:
    """Parameters + gradients + optimizer state (+ an engine's master copy): what sharding divides."""
    return sum(rank.get(name, 0.0) for name in STATE)


def summarise(
    runs: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]], baseline: str = "ddp", target: bool = True
) -> dict[str, Any]:
    """Medians per (configuration, workers) over the repeats, and each configuration's ratios to ``baseline`` on as
    many workers, for the worker that holds the most. ``target``: add the issue's target for the state bytes (at most
    1/N + 10% of the baseline's at N > 1), for engines that shard all of it."""
    configs: dict[str, Any] = {}
    for (config, workers), results in runs.items():
        configs[f"{config}/N={workers}"] = {
            "config": config,
            "workers": workers,
            "samples_per_s": median(r["samples_per_s"] for r in results),
            "fit_s": median(r["fit_s"] for r in results),
            "ranks": [
                {name: median(r["ranks"][rank][name] for r in results) for name in FIGURES} for rank in range(workers)
            ],
        }

    def worst(summary: Mapping[str, Any], figure: Any) -> float:
        return max(figure(rank) for rank in summary["ranks"])

    ratios: dict[str, dict[str, float]] = {}
    for name, figures in configs.items():
        base = configs.get(f"{baseline}/N={figures['workers']}")
        if figures["config"] == baseline or base is None:
            continue
        ratio: dict[str, float] = {"state": worst(figures, state_bytes) / worst(base, state_bytes)}
        if target:
            ratio["target"] = 1 / figures["workers"] + 0.1 if figures["workers"] > 1 else 1.0
        for label, key in (("optimizer state", "optimizer_state_bytes"), ("grads", "grad_bytes")):
            base_worst = worst(base, lambda rank, key=key: rank[key])
            if base_worst:
                ratio[label] = worst(figures, lambda rank, key=key: rank[key]) / base_worst
        ratio["peak RSS"] = worst(figures, lambda rank: rank["peak_rss_bytes"]) / worst(
            base, lambda rank: rank["peak_rss_bytes"]
        )
        ratio["samples/s"] = figures["samples_per_s"] / base["samples_per_s"]
        ratios[f"{name} / {baseline}"] = ratio
    return {"configs": configs, "ratios": ratios}


def format_table(report: Mapping[str, Any]) -> str:
    """The per-rank table (a master column only when some engine keeps a master copy) and the ratios."""
    masters = any(rank["master_bytes"] for c in report["configs"].values() for rank in c["ranks"])
    columns = [("params MiB", "param_bytes"), ("grads MiB", "grad_bytes"), ("optim MiB", "optimizer_state_bytes")]
    if masters:
        columns.append(("master MiB", "master_bytes"))
    head = f"{'config':<22} {'rank':>4} " + " ".join(f"{label:>11}" for label, _ in columns)
    lines = [f"{head} {'sum MiB':>9} {'peak RSS MiB':>13} {'samples/s':>10}"]
    for name, figures in report["configs"].items():
        for rank, worker in enumerate(figures["ranks"]):
            speed = f"{figures['samples_per_s']:.1f}" if rank == 0 else ""
            cells = " ".join(f"{worker[key] / MIB:>11.1f}" for _, key in columns)
            lines.append(
                f"{name:<22} {rank:>4} {cells} {state_bytes(worker) / MIB:>9.1f} "
                f"{worker['peak_rss_bytes'] / MIB:>13.1f} {speed:>10}"
            )
    lines.append("")
    for name, ratios in report["ratios"].items():
        lines.append(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in ratios.items()))
    return "\n".join(lines)


Runs = dict[tuple[str, int], list[dict[str, Any]]]


def round_robin(
    configs: Sequence[str], worker_counts: Sequence[int], repeats: int, run_once: Callable[[str, int], dict[str, Any]]
) -> Runs:
    """Every (configuration, workers) ``repeats`` times, in turns, so a slow spell of the machine hits all alike."""
    runs: Runs = {}
    for repeat in range(repeats):
        for workers in worker_counts:
            for config in configs:
                result = run_once(config, workers)
                runs.setdefault((config, workers), []).append(result)
                print(f"[{repeat + 1}/{repeats}] {config} N={workers}: fit {result['fit_s']:.1f} s", flush=True)
    return runs


def publish(
    report: dict[str, Any], runs: Runs, setup: Mapping[str, Any], at_start: Mapping[str, Any], json_path: Path | None
) -> dict[str, Any]:
    """Add the setup and the machine at both ends to ``report``, print its table and the load, write the JSON."""
    report["setup"] = {**setup, "at_start": at_start, "at_end": machine()}
    print(format_table(report))
    end_load = report["setup"]["at_end"]["load_average_1min"]
    print(f"\n1-minute load average: {at_start['load_average_1min']:.1f} at the start, {end_load:.1f} at the end")
    if json_path is not None:
        runs_by_name = {f"{config}/N={workers}": results for (config, workers), results in runs.items()}
        json_path.write_text(json.dumps({**report, "runs": runs_by_name}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")
    return report


def machine() -> dict[str, Any]:
    """Where the figures come from; the 1-minute load average says how shared the cores were."""
    return {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average_1min": os.getloadavg()[0],
    }
