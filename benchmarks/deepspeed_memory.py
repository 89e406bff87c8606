"""Memory and speed of DeepSpeed ZeRO stages 1, 2 and 3 (the deepspeed backend) against the ddp backend on the same
model, for N = 1, 2 and 4 workers.

    python benchmarks/deepspeed_memory.py [--repeats 1] [--stages 1 2 3] [--json deepspeed.json]

The model, data, measurement and report are ``harness.memory``'s (the same as ``fsdp_memory.py``): per worker, the
bytes of parameters, gradients and optimizer state it holds, its peak RSS (``ru_maxrss``), and samples/s over rank 0's
training loop. DeepSpeed keeps its state in its own buffers rather than on the module, so each rank reads them from
its engine (``trainer.strategy.deepspeed_engine.optimizer``, the ZeRO optimizer), as :class:`ZeroReader` documents.
The target for a stage that shards everything (3) is at most 1/N + 10% of ddp's bytes at N = 2 and 4; stages 1 and 2
shard only the optimizer state (and the gradients), so their ratios show what each stage saves. Needs raylane-ddp and
raylane-deepspeed (which runs ZeRO on CPU workers over gloo).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
from harness.memory import (
    StateReader,
    SyntheticData,
    WideMLP,
    fit_and_measure,
    local_bytes,
    machine,
    parameter_count,
    publish,
    round_robin,
    storage_bytes,
    summarise,
)

from raylane import get_strategy


class ZeroReader(StateReader):
    """One rank's share of ZeRO's state, read from the engine's ZeRO optimizer on the worker.

    - params: the model's parameters as this rank holds them. Stage 3 partitions them: each parameter's ``ds_tensor``
      (views into one flat buffer per group, counted once). Stages 1 and 2 keep them whole (views into
      ``bit16_groups_flat``).
    - master: ZeRO's own float32 copy of this rank's partition, which its optimizer steps on and then copies back to
      the parameters: ``single_partition_of_fp32_groups`` (stages 1, 2) or ``fp32_partitioned_groups_flat`` (stage 3).
      It exists for a float32 model too (ZeRO treats the model's parameters as the low-precision copy).
    - optimizer state: the tensors in the state of the optimizer ZeRO wraps (Adam's moments of the master partition).
    - grads, when the optimizer is about to step: the parameters' ``.grad`` that are still set (stage 1 keeps them
      whole until the step) plus ZeRO's reduced partition (``averaged_gradients``; at stage 3 views into
      ``grad_partitions_flat_buffer``, counted whole). ZeRO's reduction buckets (``reduce_bucket_size`` elements,
      allocated and filled as needed) are communication buffers, like DDP's buckets, and are counted for neither.
    """

    @staticmethod
    def _zero(trainer: pl.Trainer) -> Any:
        return trainer.strategy.deepspeed_engine.optimizer  # type: ignore[attr-defined]

    def param_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        params = list(module.parameters())
        partitions = [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
        return storage_bytes(partitions or params)

    def grad_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        zero = self._zero(trainer)
        grads: list[Any] = [p.grad for p in module.parameters() if p.grad is not None]
        for partition in (getattr(zero, "averaged_gradients", None) or {}).values():
            grads.extend(_tensors(partition))
        grads.extend(_tensors(getattr(zero, "grad_partitions_flat_buffer", None)))
        return storage_bytes(grads)

    def optimizer_state_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        state = self._zero(trainer).optimizer.state
        return local_bytes(value for param_state in state.values() for value in param_state.values())

    def master_bytes(self, trainer: pl.Trainer, module: pl.LightningModule) -> int:
        zero = self._zero(trainer)
        masters = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(
            zero, "fp32_partitioned_groups_flat", []
        )
        return storage_bytes(masters)


def _tensors(value: Any) -> Iterable[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [item for entry in value for item in _tensors(entry)]
    return [value]


def run_once(config: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = WideMLP(args.width, args.layers)
    data = SyntheticData(args.samples, args.width, args.batch_size // workers)
    cpus = min(1.0, ray.cluster_resources()["CPU"] / workers)  # 4 workers on a 2-core machine: half a CPU each
    # idle_timeout=0: the workers stop after fit, so the next run starts (and measures) fresh processes.
    if config == "ddp":
        strategy = get_strategy("ddp", workers=workers, cpus_per_worker=cpus, idle_timeout=0)
        return fit_and_measure(strategy, model, data, max_epochs=1)
    stage = int(config.removeprefix("zero"))
    strategy = get_strategy("deepspeed", workers=workers, cpus_per_worker=cpus, idle_timeout=0, stage=stage)
    return fit_and_measure(strategy, model, data, ZeroReader(), max_epochs=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration; medians are reported")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3), help="ZeRO stages")
    parser.add_argument("--width", type=int, default=1024, help="width of each square layer (default: 1024)")
    parser.add_argument("--layers", type=int, default=8, help="square layers (default: 8, about 8.4M parameters)")
    parser.add_argument("--samples", type=int, default=512, help="training samples (default: 512, one epoch)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch per step (default: 64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default: 1 2 4)")
    parser.add_argument("--json", type=Path, help="also write the full results to this file")
    args = parser.parse_args(argv)
    if any(args.batch_size % n for n in args.workers):
        parser.error("--batch-size must split evenly over every worker count")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    at_start = machine()
    configs = ["ddp", *(f"zero{stage}" for stage in args.stages)]
    runs = round_robin(configs, args.workers, args.repeats, lambda config, n: run_once(config, n, args))
    setup = {
        **{k: v for k, v in vars(args).items() if k != "json"},
        "parameters": parameter_count(args.width, args.layers),
    }
    return publish(summarise(runs), runs, setup, at_start, args.json)


if __name__ == "__main__":
    main()
