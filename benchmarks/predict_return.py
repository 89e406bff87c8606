"""The driver's peak memory and the time of a ``trainer.predict`` whose outputs total 1 GiB across the ranks, against a
plain ``ray.get`` of the same tensors from actors.

    python benchmarks/predict_return.py --repeats 3 [--gib 1] [--json predict_return.json]

Two ranks each predict half the bytes (batches of float32 rows); the driver gets them back and merges them into
dataset order. The plain alternative: two actors each hold the same batches and the driver ``ray.get``s both lists.
Every measurement runs in a fresh driver process connected to one local Ray, so each starts from the same resident
memory; a thread samples it every few milliseconds. See README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import psutil
import pytorch_lightning as pl
import ray
import torch
from harness.lightning_runs import QUIET_TRAINER
from harness.report import describe_machine, load_average, machine_and_load, publish
from torch.utils.data import DataLoader, TensorDataset

from raylane import get_strategy

REPORT = "REPORT "
CONFIGS = ("raylane", "plain_ray_get")
WORKERS = 2
FEATURES = 65_536  # float32 values per sample: 256 KiB
BATCH_SIZE = 64  # samples per batch: 16 MiB


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; medians are reported (default: 3)")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of outputs over all ranks (default: 1)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)  # one measurement, in a fresh driver
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.gib <= 0:
        parser.error("--repeats must be at least 1 and --gib above 0")
    return args


def samples_for(gib: float) -> int:
    """Samples whose outputs total ``gib``, rounded to whole batches on every rank."""
    per_batch_round = WORKERS * BATCH_SIZE
    samples = int(gib * 2**30) // (FEATURES * 4)
    return max(per_batch_round, samples // per_batch_round * per_batch_round)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(REPORT + json.dumps(measure(args.child, samples_for(args.gib))), flush=True)
        return 0
    load_at_start = load_average()
    samples = samples_for(args.gib)
    runs: dict[str, list[dict[str, float]]] = {config: [] for config in CONFIGS}
    context = ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, logging_level=logging.WARNING)
    env = {**os.environ, "RAY_ADDRESS": context.address_info["address"]}
    try:
        for repeat in range(args.repeats):  # round-robin: load changes spread over both
            for config in CONFIGS:
                command = [sys.executable, __file__, "--child", config, "--gib", str(args.gib)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
                lines = [line for line in done.stdout.splitlines() if line.startswith(REPORT)]
                if done.returncode or not lines:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                    raise RuntimeError(f"the {config} driver failed with exit code {done.returncode}")
                run = json.loads(lines[-1].removeprefix(REPORT))
                runs[config].append(run)
                print(
                    f"[{repeat + 1}/{args.repeats}] {config}: {run['call_s']:.2f} s, driver peak +"
                    f"{run['peak_rss_gib']:.2f} GiB resident (+{run['peak_private_gib']:.2f} GiB private)",
                    flush=True,
                )
    finally:
        ray.shutdown()
    report = {
        "machine": machine_and_load(load_at_start),
        "outputs": {"gib": samples * FEATURES * 4 / 2**30, "samples": samples, "batch_size": BATCH_SIZE},
        "runs": runs,
        "medians": {
            config: {key: median(run[key] for run in runs[config]) for key in runs[config][0]} for config in runs
        },
    }
    publish(report, format_report(report, describe_machine(report["machine"])), args.json)
    return 0


# -- one measurement, in a fresh driver ------------------------------------------------------------------------------


class PeakMemory:
    """This process's resident memory above where it stood on entry, sampled: all of it, and its private part
    (resident minus shared pages, which include the object store's pages mapped into the driver)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.rss = self.private = 0

    def _now(self) -> tuple[int, int]:
        info = self._process.memory_info()
        return info.rss, info.rss - info.shared

    def __enter__(self) -> PeakMemory:
        self._rss0, self._private0 = self._now()
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
        # ru_maxrss catches a peak between samples; it counts from this process's start, so only a rise counts.
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if maxrss > self._maxrss0:
            self.rss = max(self.rss, maxrss - self._rss0)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._take()

    def _take(self) -> None:
        rss, private = self._now()
        self.rss, self.private = max(self.rss, rss - self._rss0), max(self.private, private - self._private0)


def measure(config: str, samples: int) -> dict[str, float]:
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING, log_to_driver=False)
    try:
        return predict_with_raylane(samples) if config == "raylane" else plain_ray_get(samples)
    finally:
        ray.shutdown()


def predict_with_raylane(samples: int) -> dict[str, float]:
    """``trainer.predict`` on warm workers (a small predict starts them first), timed and its memory sampled."""
    strategy = get_strategy("ddp", workers=WORKERS, idle_timeout=120, lightning="pytorch_lightning")
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", **QUIET_TRAINER)
    model = RowMaker()
    trainer.predict(model, DataLoader(TensorDataset(torch.arange(WORKERS * BATCH_SIZE)), batch_size=BATCH_SIZE))
    loader = DataLoader(TensorDataset(torch.arange(samples)), batch_size=BATCH_SIZE)
    with PeakMemory() as peak:
        start = time.perf_counter()
        predictions = trainer.predict(model, loader)
        call_s = time.perf_counter() - start
        returned_at = time.time()
    timeline = trainer.strategy.launcher.timeline  # type: ignore[attr-defined]
    trainer.strategy.release_workers()  # type: ignore[attr-defined]
    check(predictions, samples)
    driver, workers = timeline["driver"], timeline["workers"]
    return {
        "call_s": call_s,
        "return_s": driver["outputs_received"] - max(marks["output_collected"] for marks in workers),
        "merge_s": returned_at - driver["results_applied"],
        "peak_rss_gib": peak.rss / 2**30,
        "peak_private_gib": peak.private / 2**30,
    }


def plain_ray_get(samples: int) -> dict[str, float]:
    """Two actors hold the same batches; the driver ``ray.get``s both lists at once."""
    holder = ray.remote(num_cpus=1)(Holder)
    actors = [holder.remote(rank, samples) for rank in range(WORKERS)]
    try:
        ray.get([actor.ready.remote() for actor in actors])
        with PeakMemory() as peak:
            start = time.perf_counter()
            returned = ray.get([actor.give.remote() for actor in actors])
            call_s = time.perf_counter() - start
            got_at = time.time()
        assert sum(sum(len(batch) for batch in batches) for _, batches in returned) == samples
        return {
            "call_s": call_s,
            "return_s": got_at - max(sent_at for sent_at, _ in returned),
            "merge_s": 0.0,
            "peak_rss_gib": peak.rss / 2**30,
            "peak_private_gib": peak.private / 2**30,
        }
    finally:
        for actor in actors:
            ray.kill(actor)


def rows(indices: torch.Tensor) -> torch.Tensor:
    """One float32 row of FEATURES values per sample, each filled with its sample's index."""
    return indices.to(torch.float32).unsqueeze(1).expand(-1, FEATURES).contiguous()


def check(predictions: Sequence[Any], samples: int) -> None:
    """Merged into dataset order: batch i holds samples i*BATCH_SIZE onwards."""
    assert sum(len(batch) for batch in predictions) == samples
    for number, batch in enumerate(predictions):
        first = number * BATCH_SIZE
        assert float(batch[0, 0]) == first and float(batch[-1, -1]) == first + len(batch) - 1


class RowMaker(pl.LightningModule):
    """Predicts ``rows`` of its batch's sample indices; has no parameters to train."""

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return rows(batch[0])


class Holder:
    """An actor holding what one rank of the raylane run predicts: a list of batches of rows, in its sampler's order
    (every WORKERS-th sample)."""

    def __init__(self, rank: int, samples: int) -> None:
        mine = torch.arange(rank, samples, WORKERS)
        self._batches = [rows(chunk) for chunk in mine.split(BATCH_SIZE)]

    def ready(self) -> bool:
        return True

    def give(self) -> tuple[float, list[Any]]:
        return time.time(), self._batches


def format_report(report: Mapping[str, Any], machine: str) -> str:
    medians, outputs = report["medians"], report["outputs"]
    ours, plain = medians["raylane"], medians["plain_ray_get"]
    lines = [
        f"{outputs['gib']:.2f} GiB of predictions ({outputs['samples']} rows of {FEATURES * 4 // 1024} KiB, batches of "
        f"{outputs['batch_size']}) over {WORKERS} ranks; medians of {len(report['runs']['raylane'])} runs; {machine}",
        "",
        f"{'config':<15} {'call s':>8} {'return s':>9} {'merge s':>8} {'peak +GiB resident':>19} "
        f"{'peak +GiB private':>18}",
    ]
    for name, figures in medians.items():
        lines.append(
            f"{name:<15} {figures['call_s']:>8.2f} {figures['return_s']:>9.2f} {figures['merge_s']:>8.2f} "
            f"{figures['peak_rss_gib']:>19.2f} {figures['peak_private_gib']:>18.2f}"
        )
    lines += [
        "",
        f"raylane/plain: {ours['call_s'] / plain['call_s']:.2f}x the time (predict() on warm workers, its predict loop "
        f"included, against ray.get alone), {ours['return_s'] / plain['return_s']:.2f}x the return, "
        f"{ours['peak_rss_gib'] / plain['peak_rss_gib']:.2f}x the driver's resident peak, "
        f"{ours['peak_private_gib'] / max(plain['peak_private_gib'], 1e-9):.2f}x its private peak",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
