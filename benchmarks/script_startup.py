"""A whole training script's wall time, Ray's start included, three ways: the script calls ``ray.init()`` itself,
raylane starts Ray on the first ``fit`` (the default), or ``raylane.start_ray_in_background()`` right after
``import raylane``, so Ray (and its worker processes' imports) come up while the script imports Lightning and builds
its data and model.

    python benchmarks/script_startup.py --repeats 3 [--json script_startup.json]

Each run is a fresh interpreter, as a user's script is. See README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median

from compare_ddp_report import describe_machine, load_average, machine_and_load, publish
from compare_ddp_workload import PROCESSES

BENCHMARKS_DIR = Path(__file__).resolve().parent
VARIANTS = {
    "ray.init() first": "import ray; ray.init(address='local', num_cpus={cpus}, include_dashboard=False)",
    "raylane starts Ray in fit": "",
    "start_ray_in_background()": "raylane.start_ray_in_background(num_cpus={cpus})",
    "... (preload=True)": "raylane.start_ray_in_background(num_cpus={cpus}, preload=True)",
}
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    started = time.perf_counter()
    sys.path[:0] = [{benchmarks!r}, {examples!r}]
    import raylane
    {start_ray}
    import pytorch_lightning as pl
    imported = time.perf_counter()
    from compare_ddp_lightning import build
    from compare_ddp_workload import Workload
    trainer, model, data = build("raylane", Workload(samples={samples}, epochs=1, batch_size=256, hidden=1024))
    data.setup("fit")  # the script's own data loading, before fit
    built = time.perf_counter()
    trainer.fit(model, datamodule=data)
    done = time.perf_counter()
    print(json.dumps({{"imports_s": imported - started, "build_s": built - imported, "fit_s": done - built}}))
    """
)
PROBE_TIMEOUT_S = 600


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
    for repeat in range(args.repeats):
        for name, start_ray in VARIANTS.items():
            runs[name].append(run_script(start_ray.format(cpus=PROCESSES), args.samples))
            last = runs[name][-1]
            print(f"[{repeat + 1}/{args.repeats}] {name}: script {last['process_s']:.2f} s, fit {last['fit_s']:.2f} s")
    medians = {name: {key: median(run[key] for run in results) for key in results[0]} for name, results in runs.items()}
    report = {
        "machine": machine_and_load(load_at_start),
        "samples": args.samples,
        "runs": runs,
        "medians": medians,
    }
    lines = [
        f"{args.samples} samples x 1 epoch on {PROCESSES} workers; medians of {args.repeats} fresh interpreters; "
        + describe_machine(report["machine"]),
        "variant                      script s  imports s  build s  fit s",
    ]
    for name, figures in medians.items():
        lines.append(
            f"{name:<28} {figures['process_s']:8.2f} {figures['imports_s']:10.2f} {figures['build_s']:8.2f} "
            f"{figures['fit_s']:6.2f}"
        )
    publish(report, "\n".join(lines), args.json)
    return 0


def run_script(start_ray: str, samples: int) -> dict[str, float]:
    """Run the training script in a fresh interpreter; its phases and the whole process's wall time."""
    script = SCRIPT.format(
        benchmarks=str(BENCHMARKS_DIR),
        examples=str(BENCHMARKS_DIR.parent / "examples"),
        start_ray=start_ray,
        samples=samples,
    )
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    start = time.perf_counter()
    probe = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env
    )
    process_s = time.perf_counter() - start
    if probe.returncode != 0:
        raise RuntimeError(f"the training script failed:\n{probe.stderr[-4000:]}")
    return {**json.loads(probe.stdout.strip().splitlines()[-1]), "process_s": process_s}


if __name__ == "__main__":
    sys.exit(main())
