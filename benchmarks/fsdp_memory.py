"""Memory and speed of the fsdp backend against the ddp backend on the same model, for N = 1, 2 and 4 workers.

    python benchmarks/fsdp_memory.py --repeats 2 [--json fsdp.json]

Per worker: the bytes of parameters, of gradients (when the optimizer steps) and of optimizer state it holds (its
shard under FSDP: the local part of each DTensor), and its peak RSS (``ru_maxrss``). Per run: training throughput
(samples/s over rank 0's training loop, start-up excluded). The measurement and the report are
``harness.memory``'s, shared with the other memory benchmarks. The target for FSDP is at most 1/N + 10% of ddp's
parameter + gradient + optimizer-state bytes per worker at N = 2 and 4. Needs raylane-ddp and raylane-fsdp.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
from harness.memory import (
    SyntheticData,
    WideMLP,
    fit_and_measure,
    machine,
    parameter_count,
    publish,
    round_robin,
    summarise,
)

from raylane import get_strategy

BACKENDS = ("ddp", "fsdp")


def run_once(backend: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = WideMLP(args.width, args.layers)
    data = SyntheticData(args.samples, args.width, args.batch_size // workers)
    # Fractional CPUs when the workers outnumber the cores, so 4 workers fit a 2-core machine.
    cpus = min(1.0, ray.cluster_resources()["CPU"] / workers)
    # idle_timeout=0: the workers stop after fit, so the next run starts (and measures) fresh processes.
    strategy = get_strategy(backend, workers=workers, cpus_per_worker=cpus, idle_timeout=0)
    return fit_and_measure(strategy, model, data, max_epochs=1)


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
    at_start = machine()
    runs = round_robin(BACKENDS, args.workers, args.repeats, lambda backend, n: run_once(backend, n, args))
    setup = {
        **{k: v for k, v in vars(args).items() if k != "json"},
        "parameters": parameter_count(args.width, args.layers),
    }
    return publish(summarise(runs), runs, setup, at_start, args.json)


if __name__ == "__main__":
    main()
