"""``python warm_pool_waiting.py NAMESPACE PREFIX WANT TIMEOUT``, against ``RAY_ADDRESS``: waits until exactly ``WANT``
of the pool workers named ``PREFIX...`` in ``NAMESPACE`` wait for a claim (for 0: until none is left at all), then
prints ``POOL_REPORT {json}``: their pids, and how many pool workers it found at first.

The warm pool's tests ask this many times; it imports Ray alone, not raylane (whose import brings torch), so each
question costs a second instead of a script's imports. The test passes what raylane.warm_pool names the pool by.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import ray

PREFIX = "POOL_REPORT "


def waiting_workers(namespace: str, prefix: str, want: int, timeout_s: float) -> dict[str, Any]:
    ray.init()
    deadline = time.monotonic() + timeout_s
    first_named = None
    while True:
        named = ray.util.list_named_actors(all_namespaces=True)
        names = [actor["name"] for actor in named if actor["namespace"] == namespace]
        names = [name for name in names if name.startswith(prefix)]
        first_named = len(names) if first_named is None else first_named
        waiting = []
        for name in names:
            try:
                handle = ray.get_actor(name, namespace=namespace)
                if ray.get(handle.is_waiting.remote(), timeout=30):
                    waiting.append(ray.get(handle.pid.remote(), timeout=30))
            except Exception:  # left meanwhile
                continue
        if len(waiting) == want and (want or not names):
            return {"waiting": sorted(waiting), "first_named": first_named}
        if time.monotonic() > deadline:
            return {"waiting": sorted(waiting), "named": len(names), "timed_out": True}
        time.sleep(0.5)


if __name__ == "__main__":
    namespace, prefix, want, timeout_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    print(PREFIX + json.dumps(waiting_workers(namespace, prefix, want, timeout_s)), flush=True)
