"""Turns timed runs into the medians, throughputs and ratios that the benchmark prints and writes as JSON."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any

from harness.workload import Workload

BASELINE = "raylane"  # every ratio is this configuration over another


@dataclass(frozen=True)
class RunResult:
    """One timed ``fit``: wall time as the caller saw it; rank 0's loop time, torch threads and last training loss;
    and seconds from calling ``fit`` until every rank had finished its first optimizer step (start-up)."""

    fit_s: float
    loop_s: float
    threads: int
    train_loss: float
    first_step_s: float = float("nan")
    step_s: float = float("nan")

    @classmethod
    def from_metrics(cls, fit_s: float, metrics: Mapping[str, float], started_at: float = float("nan")) -> RunResult:
        """From the fit time, what :func:`timer.measured` returned on rank 0, and the ``time.time()`` at
        which ``fit`` was called."""
        return cls(
            fit_s,
            metrics["train_loop_s"],
            int(metrics["train_threads"]),
            metrics["train_loss"],
            metrics.get("first_step_at", float("nan")) - started_at,
            metrics.get("step_s", float("nan")),
        )


def summarise(
    runs: Mapping[str, Sequence[RunResult]],
    processes: Mapping[str, int],
    workload: Workload,
    ray_startup: Sequence[Mapping[str, float]],
    load_at_start: float,
) -> dict[str, Any]:
    """Medians per configuration, and the baseline's ratios to each other configuration (above 1: slower).

    ``load_at_start`` is the 1-minute load average when the benchmark began: other work on the machine skews every
    figure, so the report carries it next to the load at the end.
    """
    configs = {name: _summarise_config(results, processes[name], workload) for name, results in runs.items()}
    ratios = {}
    if BASELINE in configs:
        ours = configs[BASELINE]
        for name, theirs in configs.items():
            if name != BASELINE:
                ratios[f"{BASELINE}/{name}"] = {
                    "fit_time": ours["median_fit_s"] / theirs["median_fit_s"],
                    "samples_per_s": ours["samples_per_s"] / theirs["samples_per_s"],
                    "loop_time": ours["median_loop_s"] / theirs["median_loop_s"],
                }
    return {
        "machine": {**machine_info(), "load_average_1min": {"start": load_at_start, "end": load_average()}},
        "workload": workload.as_dict(),
        "repeats": max((len(results) for results in runs.values()), default=0),
        "ray_startup": {
            **{f"median_{key}": median(sample[key] for sample in ray_startup) for key in ray_startup[0]},
            "runs": [dict(sample) for sample in ray_startup],
        }
        if ray_startup
        else {},
        "configs": configs,
        "ratios": ratios,
    }


def _summarise_config(results: Sequence[RunResult], processes: int, workload: Workload) -> dict[str, Any]:
    fit_s = median(result.fit_s for result in results)
    loop_s = median(result.loop_s for result in results)
    return {
        "processes": processes,
        "batch_per_process": workload.batch_per_process(processes),
        "threads_per_process": sorted({result.threads for result in results}),
        "fit_s": [result.fit_s for result in results],
        "loop_s": [result.loop_s for result in results],
        "median_fit_s": fit_s,
        "median_loop_s": loop_s,
        # What fit() costs beyond the training loop: starting processes or actors, wrapping, tearing down.
        "median_overhead_s": median(result.fit_s - result.loop_s for result in results),
        "samples_per_s": workload.samples_trained / fit_s,
        "loop_samples_per_s": workload.samples_trained / loop_s,
        "median_final_train_loss": median(result.train_loss for result in results),
    }


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{name: installed_version(name) for name in ("torch", "pytorch-lightning", "ray", "raylane", "raylane-ddp")},
    }


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a few aligned lines for the terminal."""
    workload, machine = report["workload"], report["machine"]
    lines = [
        f"{workload['samples']} samples x {workload['epochs']} epochs, global batch {workload['batch_size']}, "
        f"hidden {workload['hidden']}; medians of {report['repeats']} runs; "
        f"{machine['cpu_cores']} cores of {machine['cpu_model']}, GPU: {machine['gpu'] or 'none'}; 1-minute load "
        f"average {machine['load_average_1min']['start']:.1f} at the start, {machine['load_average_1min']['end']:.1f} "
        "at the end",
        "",
    ]
    header = ("config", "procs", "threads", "batch/proc", "fit s", "loop s", "overhead s", "samples/s", "final loss")
    rows = [header] + [
        (
            name,
            str(config["processes"]),
            ",".join(str(threads) for threads in config["threads_per_process"]),
            str(config["batch_per_process"]),
            f"{config['median_fit_s']:.2f}",
            f"{config['median_loop_s']:.2f}",
            f"{config['median_overhead_s']:.2f}",
            f"{config['samples_per_s']:.0f}",
            f"{config['median_final_train_loss']:.3f}",
        )
        for name, config in report["configs"].items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append(
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        )
    lines.append("")
    for pair, ratio in report["ratios"].items():
        lines.append(
            f"{pair}: {ratio['fit_time']:.2f}x the fit time, {ratio['samples_per_s']:.2f}x the samples/s, "
            f"{ratio['loop_time']:.2f}x the training-loop time"
        )
    startup = report["ray_startup"]
    if startup:
        lines.append(
            f"ray.init() in a fresh interpreter: {startup['median_init_s']:.2f} s (import ray "
            f"{startup['median_import_s']:.2f} s, ray.shutdown() {startup['median_shutdown_s']:.2f} s, "
            f"whole process {startup['median_process_s']:.2f} s); not included in any fit time above"
        )
    return "\n".join(lines)


def ratio_lines(configs: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> list[str]:
    """One line per other configuration: the baseline's median figures over its (below 1: the baseline is faster)."""
    if BASELINE not in configs:
        return []
    ours = configs[BASELINE]
    return [
        f"{BASELINE}/{name}: " + ", ".join(f"{ours[key] / theirs[key]:.2f}x {key}" for key in keys)
        for name, theirs in configs.items()
        if name != BASELINE
    ]


def machine_and_load(load_at_start: float) -> dict[str, Any]:
    """The machine, with the 1-minute load average at the start of the benchmark and now (other work skews it)."""
    return {**machine_info(), "load_average_1min": {"start": load_at_start, "end": load_average()}}


def describe_machine(machine: Mapping[str, Any]) -> str:
    load = machine["load_average_1min"]
    return (
        f"{machine['cpu_cores']} cores of {machine['cpu_model']}, GPU: {machine['gpu'] or 'none'}; 1-minute load "
        f"average {load['start']:.1f} -> {load['end']:.1f}"
    )


def publish(report: Mapping[str, Any], text: str, json_path: Path | None) -> None:
    """Print the report's text; write the whole report as JSON when asked."""
    print()
    print(text)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {json_path}")
