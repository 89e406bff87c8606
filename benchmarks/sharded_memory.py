"""Memory and speed of the sharded backend against the DDP backend: a >= 20M-parameter model with Adam on 2 workers.

    python benchmarks/sharded_memory.py --repeats 3 [--json sharded.json]

Per worker: the bytes of optimizer state it holds (the tensors in its optimizer's local state: the shard, for a
sharded optimizer), the bytes of gradients it holds when the optimizer steps, and its peak RSS (``ru_maxrss``). Per
run: training throughput (samples/s over rank 0's training loop, start-up excluded). The measurement and the report
are ``harness.memory``'s, shared with the other memory benchmarks (no shared filesystem needed). Configurations run
round-robin; the table shows medians over ``--repeats``. Needs raylane-ddp and raylane-sharded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
from harness.memory import (
    StateReader,
    SyntheticData,
    WideMLP,
    fit_and_measure,
    machine,
    parameter_count,
    publish,
    summarise,
)

from raylane import get_strategy
from raylane_sharded.optimizers import local_state_bytes

WORKERS = 2
CONFIGS = {
    "ddp": ("ddp", {}),
    "sharded-fairscale": ("sharded", {"engine": "fairscale"}),
    "sharded-zero": ("sharded", {"engine": "zero"}),
}
BASELINE = "ddp"


class ShardedOptimizerReader(StateReader):
    """A sharded optimizer keeps its shard's state in the optimizer it wraps; ShardedDataParallel drops the other
    ranks' gradients after the reduction, which the default gradient count already sees."""

    def optimizer_state_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        return local_state_bytes(trainer.optimizers[0])


def run_once(config: str, args: argparse.Namespace) -> dict[str, Any]:
    backend, options = CONFIGS[config]
    pl.seed_everything(0, verbose=False)
    model = WideMLP(args.width, args.layers)
    data = SyntheticData(args.samples, args.width, args.batch_size // WORKERS)
    # idle_timeout=0: the workers stop after fit, so the next run starts (and measures) fresh processes.
    strategy = get_strategy(backend, workers=WORKERS, idle_timeout=0, **options)
    return fit_and_measure(strategy, model, data, ShardedOptimizerReader(), max_epochs=args.epochs)


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
    parameters = parameter_count(args.width, args.layers)
    print(f"model: {parameters / 1e6:.1f}M parameters, Adam, {WORKERS} workers, global batch {args.batch_size}")
    at_start = machine()
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level=logging.WARNING)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(config, WORKERS): [] for config in args.configs}
    try:
        # Round-robin, so a change in the machine's load spreads over every configuration.
        for repeat in range(args.repeats):
            for config in args.configs:
                result = run_once(config, args)
                runs[config, WORKERS].append(result)
                state = [rank["optimizer_state_bytes"] / 2**20 for rank in result["ranks"]]
                print(
                    f"[{repeat + 1}/{args.repeats}] {config}: {result['samples_per_s']:.1f} samples/s, optimizer "
                    f"state per worker {', '.join(f'{s:.1f}' for s in state)} MiB, fit {result['fit_s']:.1f} s",
                    flush=True,
                )
    finally:
        ray.shutdown()
    # Only the optimizer state (and FairScale's gradients) are sharded here: no 1/N target on the whole state.
    report = summarise(runs, BASELINE, target=False)
    setup = {
        "parameters": parameters,
        "workers": WORKERS,
        **{k: v for k, v in vars(args).items() if k not in ("json", "configs")},
    }
    print()
    publish(report, runs, setup, at_start, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
