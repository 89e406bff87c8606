"""How long the trained weights of a 100M-parameter model take to reach the driver after ``fit``, against a plain
``ray.get`` of the same number of bytes.

    python benchmarks/result_return.py --repeats 3 [--json result_return.json]

See README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import pytorch_lightning as pl
import ray
import torch
from harness.lightning_runs import QUIET_TRAINER
from harness.report import describe_machine, load_average, machine_and_load, publish
from harness.workload import PROCESSES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from raylane import get_strategy


class WideModel(pl.LightningModule):
    """``layers`` square linear layers of ``width``: 6 x 4096 is 100.7M parameters, 403 MB of fp32 weights."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)  # no optimizer state: memory for the weights only


class Holder:
    """An actor holding the same bytes as one numpy array: returning it is the plain ``ray.get`` to compare with."""

    def __init__(self, nbytes: int) -> None:
        self._array = np.ones(nbytes, dtype=np.uint8)

    def give(self) -> tuple[float, np.ndarray]:
        return time.time(), self._array


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; medians are reported")
    parser.add_argument("--width", type=int, default=4096, help="width of each linear layer (default: 4096)")
    parser.add_argument("--layers", type=int, default=6, help="linear layers (default: 6, 100.7M parameters)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    ray.init(address="local", num_cpus=PROCESSES, logging_level=logging.WARNING)
    runs: dict[str, list[float]] = {"raylane_return_s": [], "raylane_load_s": [], "plain_ray_get_s": []}
    try:
        nbytes = 0
        for repeat in range(args.repeats):
            returned, loaded, nbytes = fit_and_time_return(args.width, args.layers)
            plain = time_plain_get(nbytes)
            runs["raylane_return_s"].append(returned)
            runs["raylane_load_s"].append(loaded)
            runs["plain_ray_get_s"].append(plain)
            print(
                f"[{repeat + 1}/{args.repeats}] raylane {returned:.3f} s (+ {loaded:.3f} s load_state_dict), "
                f"plain ray.get {plain:.3f} s",
                flush=True,
            )
    finally:
        ray.shutdown()
    report = {
        "machine": machine_and_load(load_at_start),
        "model": {"width": args.width, "layers": args.layers, "weight_bytes": nbytes},
        "runs": runs,
        "medians_s": {name: median(values) for name, values in runs.items()},
    }
    publish(report, format_report(report), args.json)
    return 0


def fit_and_time_return(width: int, layers: int) -> tuple[float, float, int]:
    """One step of training on 2 workers, then: seconds from rank 0 having its output ready to the driver holding it
    (serialising, the object store, deserialising), seconds to load it into the driver's model, and weight bytes."""
    model = WideModel(width, layers)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    loader = DataLoader(TensorDataset(torch.randn(2 * PROCESSES, width)), batch_size=2)
    trainer = pl.Trainer(
        strategy=get_strategy("ddp", workers=PROCESSES), max_steps=1, accelerator="cpu", **QUIET_TRAINER
    )
    trainer.fit(model, loader)
    timeline = trainer.strategy.launcher.timeline
    driver, rank_zero = timeline["driver"], timeline["workers"][0]
    returned = driver["outputs_received"] - rank_zero["output_collected"]
    loaded = driver["results_applied"] - driver["workers_released_or_kept"]
    return returned, loaded, nbytes


def time_plain_get(nbytes: int) -> float:
    holder = ray.remote(num_cpus=0)(Holder).remote(nbytes)
    try:
        ray.get(holder.give.remote())  # once, so the array exists and the actor is warm
        sent_at, array = ray.get(holder.give.remote())
        got = time.time() - sent_at
        assert array.nbytes == nbytes
        return got
    finally:
        ray.kill(holder)


def format_report(report: Mapping[str, Any]) -> str:
    machine, model, medians = report["machine"], report["model"], report["medians_s"]
    plain = medians["plain_ray_get_s"]
    return "\n".join(
        [
            f"{model['layers']} x Linear({model['width']}, {model['width']}): {model['weight_bytes'] / 1e6:.0f} MB of "
            f"weights; {describe_machine(machine)}",
            f"raylane, rank 0's output to the driver: {medians['raylane_return_s']:.3f} s "
            f"({medians['raylane_return_s'] / plain:.2f}x the plain ray.get); then load_state_dict into the driver's "
            f"model {medians['raylane_load_s']:.3f} s",
            f"plain ray.get of the same bytes (one numpy array from an actor): {plain:.3f} s",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
