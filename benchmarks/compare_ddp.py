"""Time one training run on this machine with one process, Lightning's ddp_spawn, raylane and (optionally) Ray Train.

    python benchmarks/compare_ddp.py --repeats 3 --json ddp.json [--with-ray-train]

Every configuration trains the same model on the same data for the same epochs and optimiser steps. ``trainer.fit()``
is timed with Ray already running; what starting Ray costs a script is measured separately. See README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import ray
from harness import lightning_runs, ray_train_runs
from harness.ray_start import time_ray_startup
from harness.report import RunResult, format_table, load_average, summarise
from harness.workload import PROCESSES, Workload


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration; medians are reported")
    parser.add_argument("--samples", type=int, default=40_000, help="generated training samples (default: 40000)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch per optimiser step (default: 256)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the MLP's hidden layer (default: 1024)")
    parser.add_argument(
        "--one-process-threads",
        type=int,
        help="torch threads of the one-process run (default: torch's, usually one per core); on a busy machine "
        "several threads can run many times slower than one",
    )
    parser.add_argument("--json", type=Path, help="also write the full results to this file")
    parser.add_argument("--with-ray-train", action="store_true", help="add Ray Train's TorchTrainer to the comparison")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.one_process_threads is not None and args.one_process_threads < 1:
        parser.error("--one-process-threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        workload = Workload(samples=args.samples, epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden)
        workload.batch_per_process(PROCESSES)  # an uneven split fails now, not after minutes of runs
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    configs = list(lightning_runs.CONFIGS)
    processes = {config: lightning_runs.processes(config) for config in configs}
    if args.with_ray_train:
        try:
            ray_train_runs.check_available()
        except ray_train_runs.RayTrainUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        configs.append(ray_train_runs.CONFIG)
        processes[ray_train_runs.CONFIG] = PROCESSES

    load_at_start = load_average()
    print(f"timing ray.init() in {args.repeats} fresh interpreter(s)", flush=True)
    ray_startup = time_ray_startup(PROCESSES, args.repeats)
    # address="local": a new instance of exactly this size, even where `ray start` left a cluster address behind.
    ray.init(address="local", num_cpus=PROCESSES, logging_level=logging.WARNING)
    storage = tempfile.mkdtemp(prefix="compare_ddp_ray_train_")
    runs: dict[str, list[RunResult]] = {config: [] for config in configs}
    try:
        # Round-robin, so a change in the machine's load during the benchmark spreads over every configuration.
        for repeat in range(args.repeats):
            for config in configs:
                result = run_config(config, workload, storage, args.one_process_threads)
                runs[config].append(result)
                print(
                    f"[{repeat + 1}/{args.repeats}] {config}: fit {result.fit_s:.2f} s, "
                    f"loop {result.loop_s:.2f} s, final loss {result.train_loss:.3f}",
                    flush=True,
                )
    except ray_train_runs.RayTrainUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    report = summarise(runs, processes, workload, ray_startup, load_at_start)
    print()
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


def run_config(config: str, workload: Workload, storage: str, one_process_threads: int | None) -> RunResult:
    if config == ray_train_runs.CONFIG:
        return ray_train_runs.run(workload, storage)
    return lightning_runs.run(config, workload, one_process_threads)


if __name__ == "__main__":  # ddp_spawn's children re-import this file; they must not run the benchmark
    sys.exit(main())
