"""``raylane.testing.ensure_local_ray``: the Ray a test gets, whatever ran before it in the same process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raylane.testing import env_without_ray_address, printed_report

# A Trainer's own Ray (local_ray.ensure_ray, sized for its workers: this machine's CPU count), then a test that asks
# for more; then a Ray the script started itself, which a test's ensure_local_ray must leave alone.
SCRIPT = """
import json, os, ray
from raylane import local_ray
from raylane.testing import ensure_local_ray

cpus = os.cpu_count()
local_ray.ensure_ray(cpus_needed=1)
trainers = ray.cluster_resources()["CPU"]
ensure_local_ray(num_cpus=cpus + 1)
after = ray.cluster_resources()["CPU"]
ray.shutdown()
ray.init(address="local", num_cpus=1, include_dashboard=False)
ensure_local_ray(num_cpus=cpus + 1)
print("REPORT " + json.dumps({"cpus": cpus, "trainers": trainers, "after": after,
                              "own": ray.cluster_resources()["CPU"]}))
"""


@pytest.mark.timeout(180)
def test_a_trainers_smaller_ray_is_replaced_and_the_scripts_own_is_kept() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env_without_ray_address(), capture_output=True, text=True, timeout=170
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = printed_report(done.stdout)
    assert report["trainers"] == report["cpus"], "raylane's own Ray has this machine's CPU count"
    assert report["after"] == report["cpus"] + 1, "a test that needs more CPUs gets a Ray with them"
    assert report["own"] == 1, "a Ray the tests started themselves is left as it is"
