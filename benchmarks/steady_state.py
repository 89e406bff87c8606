"""Per-step training time of raylane's DDP against Lightning's ``ddp_spawn``: same model, data, processes and threads.

    python benchmarks/steady_state.py --repeats 5 [--json steady_state.json]

Each run's figure is rank 0's median time between the ends of consecutive training steps, after a warm-up
(start-up excluded); the report gives the median over runs. See README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import median

import ray
from harness import lightning_runs
from harness.report import RunResult, describe_machine, load_average, machine_and_load, publish
from harness.timer import WARM_UP_STEPS
from harness.workload import PROCESSES, Workload

CONFIGS = ("ddp_spawn", "raylane")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each configuration (default: 5)")
    parser.add_argument("--samples", type=int, default=40_000, help="generated training samples (default: 40000)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch per step (default: 256)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the MLP's hidden layer (default: 1024)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(samples=args.samples, epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden)
    load_at_start = load_average()
    ray.init(address="local", num_cpus=PROCESSES, logging_level=logging.WARNING)
    runs: dict[str, list[RunResult]] = {config: [] for config in CONFIGS}
    try:
        for repeat in range(args.repeats):
            # Alternate which goes first, so a trend in the machine's load favours neither.
            for config in CONFIGS if repeat % 2 == 0 else reversed(CONFIGS):
                result = lightning_runs.run(config, workload)
                runs[config].append(result)
                print(f"[{repeat + 1}/{args.repeats}] {config}: median step {result.step_s * 1e3:.2f} ms", flush=True)
    finally:
        ray.shutdown()
    step_ms = {config: median(r.step_s for r in results) * 1e3 for config, results in runs.items()}
    report = {
        "machine": machine_and_load(load_at_start),
        "workload": workload.as_dict(),
        "warm_up_steps": WARM_UP_STEPS,
        "step_ms_per_run": {config: [r.step_s * 1e3 for r in results] for config, results in runs.items()},
        "median_step_ms": step_ms,
        "raylane/ddp_spawn": step_ms["raylane"] / step_ms["ddp_spawn"],
    }
    lines = [
        f"{workload.samples} samples x {workload.epochs} epochs, global batch {workload.batch_size} "
        f"({workload.batch_per_process(PROCESSES)} per process), hidden {workload.hidden}; {args.repeats} runs each; "
        + describe_machine(report["machine"])
    ]
    for config in CONFIGS:
        per_run = " / ".join(f"{ms:.2f}" for ms in report["step_ms_per_run"][config])
        lines.append(f"{config:<10} median step {step_ms[config]:.2f} ms (runs: {per_run})")
    lines.append(f"raylane/ddp_spawn: {report['raylane/ddp_spawn']:.3f}x the step time")
    publish(report, "\n".join(lines), args.json)
    return 0


if __name__ == "__main__":  # ddp_spawn's children re-import this file; they must not run the benchmark
    sys.exit(main())
