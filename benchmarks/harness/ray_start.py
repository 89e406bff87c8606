"""What starting Ray costs a script, measured in fresh interpreters.

The fit times are taken with Ray already running, as on a cluster. A laptop script that lets raylane start Ray pays
this on top, once per script, so it is measured apart: in a new process each time, as a user's script would start.
Run it before this process starts its own Ray instance, so the two never compete for the cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

PROBE = textwrap.dedent(
    """
    import json, logging, sys, time
    start = time.perf_counter()
    import ray
    imported = time.perf_counter()
    ray.init(address="local", num_cpus=int(sys.argv[1]), logging_level=logging.WARNING)
    ready = time.perf_counter()
    ray.shutdown()
    done = time.perf_counter()
    print(json.dumps({"import_s": imported - start, "init_s": ready - imported, "shutdown_s": done - ready}))
    """
)
PROBE_TIMEOUT_S = 300


def time_ray_startup(cpus: int, repeats: int) -> list[dict[str, float]]:
    """Per fresh interpreter: ``import ray``, ``ray.init()`` and ``ray.shutdown()`` seconds, and the whole process."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, str(cpus)], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
        )
        process_s = time.perf_counter() - start
        if probe.returncode != 0:
            raise RuntimeError(f"timing ray.init() in a fresh interpreter failed:\n{probe.stderr[-4000:]}")
        samples.append({**json.loads(probe.stdout.strip().splitlines()[-1]), "process_s": process_s})
    return samples
