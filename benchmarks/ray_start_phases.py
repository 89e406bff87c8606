"""Where a local ``ray.init()``'s seconds go: the waits it is made of, with the driver idle and with the driver
importing Lightning meanwhile (what ``import raylane`` arranges in a training script).

    python benchmarks/ray_start_phases.py --repeats 3 [--json ray_start_phases.json]

A script's cold first step cannot come before Ray is up, so this is the floor under issue 16's cold-start goals.
Each run is a fresh interpreter calling ``ray.init(address="local", include_dashboard=False)`` under cProfile, as
raylane's own start does; the phases are the cumulative times of Ray's own functions on that call's path:

- **dashboard wait**: ``ray._private.services.start_api_server``, which starts the dashboard's head process (in its
  minimal form even with ``include_dashboard=False``) and polls every 0.1 s until that process has published its
  address;
- **raylet wait**: ``ray._private.services.get_node``, a blocking call that returns once the raylet has registered
  with the GCS. The raylet registers after its dashboard agent and runtime-env agent (Python processes it starts)
  are up; its log (``raylet.out``) shows the gap;
- **driver connect**: ``ray._private.worker.connect``, the driver's core worker joining the raylet;
- **other**: the rest (starting the GCS, the log monitor and the autoscaler monitor, reading the config).

See README.md for the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

from harness.report import describe_machine, load_average, machine_and_load, publish

PHASES = {  # label: (module file, function name) whose cumulative time is the phase
    "dashboard_wait_s": ("ray/_private/services.py", "start_api_server"),
    "raylet_wait_s": ("ray/_private/services.py", "get_node"),
    "connect_s": ("ray/_private/worker.py", "connect"),
}
PROBE = textwrap.dedent(
    """
    import cProfile, json, logging, pstats, sys, threading, time
    import ray

    phases = json.loads(sys.argv[1])
    beside_imports = sys.argv[2] == "1"
    profile = cProfile.Profile()
    timing = {}

    def start():
        started = time.perf_counter()
        profile.enable()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        profile.disable()
        timing["init_s"] = time.perf_counter() - started

    thread = threading.Thread(target=start)
    thread.start()
    if beside_imports:
        import pytorch_lightning  # what the script does while raylane's start runs on its thread
    thread.join()
    stats = pstats.Stats(profile).stats
    for label, (path, name) in phases.items():
        timing[label] = sum(
            row[3] for (file, _, function), row in stats.items() if file.endswith(path) and function == name
        )
    timing["other_s"] = timing["init_s"] - sum(timing[label] for label in phases)
    ray.shutdown()
    print("PHASES " + json.dumps(timing))
    """
)
PROBE_TIMEOUT_S = 300
SETTINGS = {"driver idle": "0", "driver importing Lightning": "1"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fresh interpreters per setting (default: 3)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    return parser.parse_args(argv)


def measure(beside_imports: str) -> dict[str, float]:
    """One fresh interpreter's ``ray.init()`` and its phases, in seconds."""
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(PHASES), beside_imports],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
    )
    lines = [line for line in probe.stdout.splitlines() if line.startswith("PHASES ")]
    if probe.returncode != 0 or not lines:
        raise RuntimeError(f"the probe failed:\n{probe.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("PHASES "))  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for repeat in range(args.repeats):  # round-robin: load changes spread over both settings
        for name, beside_imports in SETTINGS.items():
            runs[name].append(measure(beside_imports))
            print(f"[{repeat + 1}/{args.repeats}] {name}: ray.init {runs[name][-1]['init_s']:.2f} s", flush=True)
    medians = {name: {key: median(run[key] for run in results) for key in results[0]} for name, results in runs.items()}
    report = {"machine": machine_and_load(load_at_start), "runs": runs, "medians": medians}
    publish(report, format_report(report, args.repeats), args.json)
    return 0


def format_report(report: Mapping[str, Any], repeats: int) -> str:
    lines = [
        f"ray.init(address='local', num_cpus=2, include_dashboard=False); medians of {repeats} fresh interpreters; "
        + describe_machine(report["machine"]),
        "setting                      ray.init s  dashboard wait s  raylet wait s  connect s  other s",
    ]
    for name, figures in report["medians"].items():
        lines.append(
            f"{name:<28} {figures['init_s']:10.2f} {figures['dashboard_wait_s']:17.2f} "
            f"{figures['raylet_wait_s']:14.2f} {figures['connect_s']:10.2f} {figures['other_s']:8.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
