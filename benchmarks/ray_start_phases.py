"""Where a local ``ray.init()``'s seconds go, and what another Ray holding the dashboard agent's default port costs
it: with the port free; held by another process (another Ray's agent: a ``ray start --head``, a notebook's Ray, or
the agent of a Ray that ``ray.shutdown()`` stopped, which lingers for about a minute); and held, with the agent on a
port of its own as raylane starts Ray (``raylane._ray.agent_port_of_its_own``).

    python benchmarks/ray_start_phases.py --repeats 3 [--json ray_start_phases.json]

A script's cold first step cannot come before Ray is up, so this is the floor under issue 16's cold-start goals.
Each run is a fresh interpreter calling ``ray.init(address="local", include_dashboard=False)`` under cProfile; the
phases are the cumulative times of Ray's own functions on that call's path:

- **dashboard wait**: ``ray._private.services.start_api_server``, which starts the dashboard's head process (in its
  minimal form even with ``include_dashboard=False``) and polls every 0.1 s until that process has published its
  address;
- **raylet wait**: ``ray._private.services.get_node``, which returns once the raylet has registered with the GCS.
  The raylet registers once its dashboard agent is up; an agent whose HTTP port is taken retries the bind for 3.4 s
  first (its log, ``dashboard_agent.log``, shows the retries);
- **driver connect**: ``ray._private.worker.connect``, the driver's core worker joining the raylet;
- **other**: the rest (starting the GCS, the log monitor and the autoscaler monitor, reading the config).

Each probe stops its Ray the way raylane does (``raylane._ray.stop_ray``), which leaves no agent behind to hold the
port for the next probe. See README.md for the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
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
    import contextlib, cProfile, json, logging, pstats, sys, time
    import ray
    from raylane import _ray

    phases = json.loads(sys.argv[1])
    own_port = _ray.agent_port_of_its_own() if sys.argv[2] == "1" else contextlib.nullcontext()
    profile = cProfile.Profile()
    started = time.perf_counter()
    with own_port:
        profile.enable()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        profile.disable()
    timing = {"init_s": time.perf_counter() - started}
    stats = pstats.Stats(profile).stats
    for label, (path, name) in phases.items():
        timing[label] = sum(
            row[3] for (file, _, function), row in stats.items() if file.endswith(path) and function == name
        )
    timing["other_s"] = timing["init_s"] - sum(timing[label] for label in phases)
    _ray.stop_ray(flush_logs=False)
    print("PHASES " + json.dumps(timing))
    """
)
PROBE_TIMEOUT_S = 300
DEFAULT_AGENT_PORT = 52365  # raylane._ray.SHARED_AGENT_PORT; not imported, so this process imports no Ray
# name: (the default agent port held by another process, the agent on a port of its own)
SETTINGS = {
    "port free": (False, False),
    "port held by another process": (True, False),
    "port held, raylane's free port": (True, True),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fresh interpreters per setting (default: 3)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    return parser.parse_args(argv)


def measure(held: bool, own_port: bool) -> dict[str, float]:
    """One fresh interpreter's ``ray.init()`` and its phases, in seconds."""
    with port_held(DEFAULT_AGENT_PORT) if held else contextlib.nullcontext():
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(PHASES), "1" if own_port else "0"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    lines = [line for line in probe.stdout.splitlines() if line.startswith("PHASES ")]
    if probe.returncode != 0 or not lines:
        raise RuntimeError(f"the probe failed:\n{probe.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("PHASES "))  # type: ignore[no-any-return]


@contextlib.contextmanager
def port_held(port: int) -> Iterator[None]:
    """``port`` held by a listening socket of this process, as another Ray's agent would hold it."""
    with socket.socket() as holder:
        holder.bind(("", port))
        holder.listen()
        yield


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with port_held(DEFAULT_AGENT_PORT):
            pass
    except OSError:
        print(
            f"port {DEFAULT_AGENT_PORT} is taken (another Ray's agent?): stop that Ray (`ray stop`) first",
            file=sys.stderr,
        )
        return 1
    load_at_start = load_average()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for repeat in range(args.repeats):  # round-robin: load changes spread over every setting
        for name, (held, own_port) in SETTINGS.items():
            runs[name].append(measure(held, own_port))
            print(f"[{repeat + 1}/{args.repeats}] {name}: ray.init {runs[name][-1]['init_s']:.2f} s", flush=True)
    medians = {name: {key: median(run[key] for run in results) for key in results[0]} for name, results in runs.items()}
    report = {"machine": machine_and_load(load_at_start), "runs": runs, "medians": medians}
    publish(report, format_report(report, args.repeats), args.json)
    return 0


def format_report(report: Mapping[str, Any], repeats: int) -> str:
    lines = [
        f"ray.init(address='local', num_cpus=2, include_dashboard=False); medians of {repeats} fresh interpreters; "
        + describe_machine(report["machine"]),
        "setting                          ray.init s  dashboard wait s  raylet wait s  connect s  other s",
    ]
    for name, figures in report["medians"].items():
        lines.append(
            f"{name:<32} {figures['init_s']:10.2f} {figures['dashboard_wait_s']:17.2f} "
            f"{figures['raylet_wait_s']:14.2f} {figures['connect_s']:10.2f} {figures['other_s']:8.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
