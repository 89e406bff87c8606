"""A whole training script's wall time, Ray's start included, against the same script with Lightning's ``ddp_spawn``:
what a user feels between ``python train.py`` and the prompt coming back, and between ``fit()`` and the first
optimizer step of a script's first Trainer (the cold start).

    python benchmarks/script_startup.py --repeats 3 [--json script_startup.json]

Variants: ``ddp_spawn``; raylane as it starts by default (Ray at ``import raylane``, the workers when the Trainer is
built, and Ray stopped quickly at exit); a script that imports Ray itself (Ray then starts with the Trainer); raylane
with ``RAYLANE_EARLY_START=0`` (Ray and the workers start inside ``fit``); a script that calls ``ray.init()``
itself first; and two scripts on a Ray that is already running (a ``ray start --head`` this benchmark starts for them
in each round, reached through ``RAY_ADDRESS``): with the warm pool the previous script left (``raylane.warm_pool``;
an untimed run leaves the first one) and with ``RAYLANE_WARM_POOL=0``. Each run is a fresh interpreter, as a user's
script is. See README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

from harness.report import describe_machine, load_average, machine_and_load, publish
from harness.workload import PROCESSES

BENCHMARKS_DIR = Path(__file__).resolve().parent
DDP_SPAWN = "ddp_spawn"
DEFAULT = "raylane (default)"
WARM_POOL = "raylane, running Ray, warm pool"
# Token authentication off, on the head and its drivers alike: it is Ray's own concern, and the same for all variants.
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}
ON_HEAD = {"RAY_ADDRESS": "{address}", **NO_AUTH}
# name: (configuration, the script's first lines, extra environment)
VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    DDP_SPAWN: ("ddp_spawn", "", {}),  # imports neither raylane nor Ray, as a plain Lightning script
    DEFAULT: ("raylane", "import raylane", {}),
    # A script that imports Ray itself: Ray starts when the Trainer is built, not at `import raylane`.
    "raylane, Ray started with Trainer": ("raylane", "import ray; import raylane", {}),
    "raylane, RAYLANE_EARLY_START=0": ("raylane", "import raylane", {"RAYLANE_EARLY_START": "0"}),
    "raylane, ray.init() first": (
        "raylane",
        "import raylane, ray; ray.init(address='local', num_cpus={cpus}, include_dashboard=False)",
        {},
    ),
    # A workstation's `ray start --head`: the Ray outlives each script ({address} is the benchmark's own head).
    "raylane, running Ray, pool off": (
        "raylane",
        "import raylane",
        {"RAY_ADDRESS": "{address}", "RAYLANE_WARM_POOL": "0"},
    ),
    WARM_POOL: ("raylane", "import raylane", {"RAY_ADDRESS": "{address}"}),
}
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    started = time.perf_counter()
    sys.path[:0] = [{benchmarks!r}, {examples!r}]
    {first_lines}
    import pytorch_lightning as pl
    imported = time.perf_counter()
    from harness.lightning_runs import build
    from harness.timer import measured
    from harness.workload import Workload

    if __name__ == "__main__":  # ddp_spawn's children import this file again
        trainer, model, data = build({config!r}, Workload(samples={samples}, epochs=1, batch_size=256, hidden=1024))
        data.setup("fit")  # the script's own data loading, before fit
        built = time.perf_counter()
        fit_called_at = time.time()
        trainer.fit(model, datamodule=data)
        done = time.perf_counter()
        first_step_s = measured(trainer.callback_metrics)["first_step_at"] - fit_called_at
        print(json.dumps({{"imports_s": imported - started, "build_s": built - imported, "fit_s": done - built,
                          "first_step_s": first_step_s, "until_fit_returned_s": done - started}}))
    """
)
PROBE_TIMEOUT_S = 600
GOALS = (  # (label, raylane's variant, figure, the most it may take as a multiple of ddp_spawn's)
    ("whole script", DEFAULT, "process_s", 1.0),
    ("fit() to the first step, cold", DEFAULT, "first_step_s", 0.5),
    ("fit() with Ray already running", WARM_POOL, "fit_s", 0.5),
)
HEAD_START_TIMEOUT_S = 90


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (default: 3)")
    parser.add_argument("--samples", type=int, default=4096, help="generated training samples (default: 4096)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):  # round-robin: load changes spread over every variant
        local = [name for name, (_, _, env) in VARIANTS.items() if "RAY_ADDRESS" not in env]
        for name in local:
            _run_variant(runs, name, repeat, args)
        # The head runs only for its own variants: a second Ray on the machine slowed the others' start by seconds.
        with ray_head(PROCESSES) as address:
            on_head = [name for name in VARIANTS if name not in local]
            run_script(*_variant(WARM_POOL, address), args.samples)  # untimed: leaves the pool the next run finds
            for name in on_head:
                _run_variant(runs, name, repeat, args, address)
    medians = {name: {key: median(run[key] for run in results) for key in results[0]} for name, results in runs.items()}
    report = {
        "machine": machine_and_load(load_at_start),
        "samples": args.samples,
        "runs": runs,
        "medians": medians,
        "goals": goal_ratios(medians),
    }
    publish(report, format_report(report, args), args.json)
    return 0


def _variant(name: str, address: str = "") -> tuple[str, str, dict[str, str]]:
    config, first_lines, env = VARIANTS[name]
    return (
        config,
        first_lines.format(cpus=PROCESSES),
        {key: value.format(address=address) for key, value in env.items()},
    )


def _run_variant(
    runs: dict[str, list[dict[str, float]]], name: str, repeat: int, args: argparse.Namespace, address: str = ""
) -> None:
    runs[name].append(run_script(*_variant(name, address), args.samples))
    last = runs[name][-1]
    print(
        f"[{repeat + 1}/{args.repeats}] {name}: script {last['process_s']:.2f} s, fit {last['fit_s']:.2f} s, "
        f"first step {last['first_step_s']:.2f} s after fit(), load {load_average():.1f}",
        flush=True,
    )


def goal_ratios(medians: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """raylane over ddp_spawn for each goal, with the goal."""
    theirs = medians[DDP_SPAWN]
    return {
        label: {"variant": ours, "ratio": medians[ours][key] / theirs[key], "goal": goal}
        for label, ours, key, goal in GOALS
    }


def format_report(report: Mapping[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{args.samples} samples x 1 epoch on {PROCESSES} processes; medians of {args.repeats} fresh interpreters; "
        + describe_machine(report["machine"]),
        "variant                            script s  imports s  build s  fit s  first step s  exit s",
    ]
    for name, figures in report["medians"].items():
        # Whatever the script's own clock did not see: the interpreter's start (the same for all) and its exit.
        exit_s = figures["process_s"] - figures["until_fit_returned_s"]
        lines.append(
            f"{name:<34} {figures['process_s']:8.2f} {figures['imports_s']:10.2f} {figures['build_s']:8.2f} "
            f"{figures['fit_s']:6.2f} {figures['first_step_s']:13.2f} {exit_s:7.2f}"
        )
    lines.append("")
    for label, figures in report["goals"].items():
        verdict = "met" if figures["ratio"] <= figures["goal"] else "not met"
        lines.append(
            f"{figures['variant']} / {DDP_SPAWN}, {label}: {figures['ratio']:.2f}x (goal at most {figures['goal']:g}x: "
            f"{verdict})"
        )
    return "\n".join(lines)


def run_script(config: str, first_lines: str, extra_env: Mapping[str, str], samples: int) -> dict[str, float]:
    """Run the training script in a fresh interpreter; its phases and the whole process's wall time."""
    script = SCRIPT.format(
        benchmarks=str(BENCHMARKS_DIR),
        examples=str(BENCHMARKS_DIR.parent / "examples"),
        first_lines=first_lines,
        config=config,
        samples=samples,
    )
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env.update(extra_env)
    start = time.perf_counter()
    # A file, not `python -c`: ddp_spawn's children import the main module again by its path.
    with _script_file(script) as path:
        probe = subprocess.run(
            [sys.executable, str(path)], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env
        )
    process_s = time.perf_counter() - start
    if probe.returncode != 0:
        raise RuntimeError(f"the training script failed:\n{probe.stderr[-4000:]}")
    return {**json.loads(probe.stdout.strip().splitlines()[-1]), "process_s": process_s}


@contextmanager
def ray_head(cpus: int) -> Iterator[str]:
    """A ``ray start --head`` of its own (its own temp dir and port, no dashboard), for the variants on a running
    Ray; its address. Every process of it is stopped afterwards (its own process group), pool workers included."""
    temp_dir = tempfile.mkdtemp(prefix="rlb", dir="/tmp")  # short: Ray's socket paths live under it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    command += ["--num-cpus", str(cpus), "--num-gpus", "0", "--include-dashboard", "false", "--temp-dir", temp_dir]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"} | NO_AUTH
    head = subprocess.Popen(
        [*command, "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while subprocess.run([str(ray_cli), "status", "--address", address], env=env, capture_output=True).returncode:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head did not come up")
            time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def _script_file(text: str) -> Iterator[Path]:
    """The script in a temporary file of its own, removed afterwards."""
    handle, name = tempfile.mkstemp(prefix="script_startup_", suffix=".py")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
