"""The largest model (by parameter count) that trains on 4 CPU workers when each worker may use at most a fixed amount
of memory, fsdp against ddp.

    python benchmarks/fsdp_largest.py [--budget-gib 2] [--workers 4] [--width 2048] [--json largest.json]

The model is ``harness.memory``'s WideMLP (square ``--width`` Linear layers and a head, Adam), trained for
``--steps`` optimizer steps per probe; the search varies its number of layers (one layer of width 2048 is 4.2M
parameters). ddp builds the model on the driver, as it must; fsdp builds it on the ``meta`` device, as the backend's
docs say to for big models, so each worker allocates only its shard (``materialize`` after ``fully_shard``).

How the budget is enforced, in every worker (:class:`BudgetWatch`):

- a thread samples the process's resident set size (RSS, ``psutil``) every 50 ms from the start of fit (Lightning's
  ``setup``, before the model is sharded) to the end of training, and kills the process with SIGKILL the moment it
  is above the budget, as a cgroup memory limit or the kernel's OOM killer would; the run fails and the probe counts
  as over budget (the thread leaves a note in a directory the driver reads, so no other failure counts as one);
- at the end of training the process's peak RSS as the kernel recorded it (``ru_maxrss``, from the process's start:
  unpickling the payload included) must be within the budget too, which catches a peak shorter than 50 ms.

Not used: Ray's ``memory=`` resource only schedules, it limits nothing; ``RLIMIT_AS`` caps virtual address space,
which torch, glibc's per-thread arenas and Ray's threads reserve far beyond what they touch, so it fails runs that fit.
RSS counts the pages the process has mapped, shared ones too (the Python, torch and Ray runtime, about 0.7 GiB here,
and the object-store pages the payload is read from), so it is the strict reading. After training, rank 0 gathers
the full weights to send them to the driver (one full copy in its memory); that is result return, outside the budget.

Search: probes at 2 and 6 layers give RSS as a line in the parameter count; its crossing with the budget is the next
probe; then bisection between the largest size that fitted and the smallest that did not, until they are one layer
apart (or ``--max-probes``). Every probe starts fresh workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import pytorch_lightning as pl
import ray
import torch
from harness.memory import (
    FIGURES,
    MIB,
    QUIET,
    SyntheticData,
    WideMLP,
    WorkerFigures,
    machine,
    parameter_count,
    state_bytes,
)

from raylane import WorkerError, get_strategy

GIB = 2**30
SAMPLE_S = 0.05
CALIBRATION = (2, 6)  # layers of the first two probes


class BudgetWatch(pl.Callback):
    """Kills this worker the moment its RSS is above ``budget`` bytes, and fails training when its peak was."""

    def __init__(self, budget: int, notes: str) -> None:
        self.budget = budget
        self.notes = notes
        self._stop: threading.Event | None = None  # made on the worker: the callback travels pickled

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(trainer.global_rank, self._stop), daemon=True).start()

    def _watch(self, rank: int, stop: threading.Event) -> None:
        process = psutil.Process()
        while not stop.wait(SAMPLE_S):
            rss = process.memory_info().rss
            if rss > self.budget:
                self._note(rank, rss, "sampled")
                os.kill(os.getpid(), signal.SIGKILL)

    def _note(self, rank: int, rss: int, how: str) -> None:
        path = Path(self.notes) / f"over-budget-rank{rank}.json"
        path.write_text(json.dumps({"rank": rank, "rss_bytes": rss, "how": how}))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_watching()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if peak > self.budget:
            self._note(trainer.global_rank, peak, "ru_maxrss")
            raise MemoryError(f"rank {trainer.global_rank}: peak RSS {peak / MIB:.0f} MiB, over the budget")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_watching()

    def _stop_watching(self) -> None:
        if self._stop is not None:
            self._stop.set()


def probe(config: str, layers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``layers`` layers for a few steps under the budget: the figures, or why it did not fit."""
    pl.seed_everything(0, verbose=False)
    if config == "fsdp":
        with torch.device("meta"):  # no weights on the driver; each worker allocates and initialises its shard
            model = WideMLP(args.width, layers)
    else:
        model = WideMLP(args.width, layers)
    data = SyntheticData(args.batch_per_worker * args.workers * args.steps, args.width, args.batch_per_worker)
    cpus = min(1.0, ray.cluster_resources()["CPU"] / args.workers)
    # Fresh workers for every probe (nothing reused, nothing kept), so each process's peak is this probe's.
    strategy = get_strategy(config, workers=args.workers, cpus_per_worker=cpus, idle_timeout=0, reuse_workers=False)
    result: dict[str, Any] = {"layers": layers, "parameters": parameter_count(args.width, layers)}
    with tempfile.TemporaryDirectory(prefix="raylane-budget-") as notes:
        callbacks = [BudgetWatch(int(args.budget_gib * GIB), notes), WorkerFigures()]
        trainer = pl.Trainer(strategy=strategy, callbacks=callbacks, max_steps=args.steps, **QUIET)
        try:
            trainer.fit(model, datamodule=data)
        except WorkerError:
            over = [json.loads(path.read_text()) for path in Path(notes).glob("over-budget-*.json")]
            if not over:
                raise  # a failure the budget did not cause: not a measurement
            return {**result, "fits": False, "over_budget": over}
    metrics = trainer.callback_metrics
    ranks = [{name: float(metrics[f"bench/rank{rank}/{name}"]) for name in FIGURES} for rank in range(args.workers)]
    return {**result, "fits": True, "ranks": ranks}


def next_size(fitted: list[dict[str, Any]], lo: int, hi: int | None, budget: float) -> int:
    """Bisect once a size failed; before that, follow the line through the peak RSS of the sizes that fitted."""
    if hi is not None:
        return (lo + hi) // 2
    if len(fitted) >= 2:
        (x0, y0), (x1, y1) = [(r["layers"], max(k["peak_rss_bytes"] for k in r["ranks"])) for r in fitted[-2:]]
        if y1 > y0 and x1 != x0:
            crossing = x1 + (budget - y1) * (x1 - x0) / (y1 - y0)
            return max(lo + 1, int(crossing))
    return lo * 2


def search(config: str, args: argparse.Namespace) -> dict[str, Any]:
    budget = args.budget_gib * GIB
    probes: list[dict[str, Any]] = []
    lo, hi = 0, None
    sizes = list(CALIBRATION)
    while len(probes) < args.max_probes and (hi is None or hi - lo > 1):
        layers = sizes.pop(0) if sizes else next_size([p for p in probes if p["fits"]], lo, hi, budget)
        if hi is not None and layers >= hi:
            break
        try:
            outcome = probe(config, layers, args)
        except Exception as failure:  # not the budget (a crash, the machine itself out of memory): stop searching
            print(f"{config}: {layers} layers: the probe failed for another reason, search stopped: {failure!r}")
            return {"largest": _largest(probes), "smallest_over": hi, "probes": probes, "stopped": repr(failure)}
        probes.append(outcome)
        if outcome["fits"]:
            lo = max(lo, layers)
        else:
            hi = layers if hi is None else min(hi, layers)
            sizes = [s for s in sizes if s < layers]
        rss = describe(outcome)
        print(f"{config}: {layers} layers ({outcome['parameters'] / 1e6:.1f}M params): {rss}", flush=True)
    return {"largest": _largest(probes), "smallest_over": hi, "probes": probes}


def _largest(probes: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max((p for p in probes if p["fits"]), key=lambda p: p["layers"], default=None)


def describe(outcome: dict[str, Any]) -> str:
    if outcome["fits"]:
        peak = max(rank["peak_rss_bytes"] for rank in outcome["ranks"])
        return f"fits, peak RSS {peak / MIB:.0f} MiB (worst worker)"
    worst = max(outcome["over_budget"], key=lambda note: note["rss_bytes"])
    return f"over budget (rank {worst['rank']}: {worst['rss_bytes'] / MIB:.0f} MiB, {worst['how']})"


def format_report(report: dict[str, Any], budget_gib: float) -> str:
    lines = [
        f"{'config':<6} {'largest fitting':>16} {'params':>9} {'peak RSS MiB':>13} {'state MiB/worker':>17} "
        f"{'first over (layers)':>20} {'probes':>7}"
    ]
    for config, found in report["configs"].items():
        largest = found["largest"]
        if largest is None:
            lines.append(f"{config:<6} {'none':>16}")
            continue
        peak = max(rank["peak_rss_bytes"] for rank in largest["ranks"])
        state = max(state_bytes(rank) for rank in largest["ranks"])
        over = found["smallest_over"] if found["smallest_over"] is not None else "-"
        lines.append(
            f"{config:<6} {largest['layers']:>9} layers {largest['parameters'] / 1e6:>8.1f}M {peak / MIB:>13.0f} "
            f"{state / MIB:>17.0f} {over!s:>20} {len(found['probes']):>7}"
        )
    if "fsdp/ddp" in report:
        lines.append(f"\nlargest model under {budget_gib:g} GiB per worker, fsdp / ddp: {report['fsdp/ddp']:.2f}x")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gib", type=float, default=2.0, help="memory per worker, GiB (default: 2)")
    parser.add_argument("--workers", type=int, default=4, help="workers (default: 4)")
    parser.add_argument("--width", type=int, default=2048, help="width of each square layer (default: 2048)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per probe (default: 2)")
    parser.add_argument("--batch-per-worker", type=int, default=4, help="samples per worker per step (default: 4)")
    parser.add_argument("--max-probes", type=int, default=7, help="probes per backend at most (default: 7)")
    parser.add_argument("--configs", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--json", type=Path, help="also write every probe to this file")
    args = parser.parse_args(argv)
    if args.budget_gib <= 0 or args.steps < 1 or args.max_probes < len(CALIBRATION):
        parser.error(f"--budget-gib must be positive, --steps at least 1, --max-probes at least {len(CALIBRATION)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    # The driver's fsdp model stays on the meta device: the full weights raylane brings back load into it as no-ops.
    warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter in the checkpoint to a meta")
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    at_start = machine()
    report: dict[str, Any] = {"configs": {config: search(config, args) for config in args.configs}}
    found = {config: result["largest"] for config, result in report["configs"].items()}
    if found.get("ddp") and found.get("fsdp"):
        report["fsdp/ddp"] = found["fsdp"]["parameters"] / found["ddp"]["parameters"]
    report["setup"] = {
        **{k: v for k, v in vars(args).items() if k != "json"},
        "at_start": at_start,
        "at_end": machine(),
    }
    print(format_report(report, args.budget_gib))
    end_load = report["setup"]["at_end"]["load_average_1min"]
    print(f"1-minute load average: {at_start['load_average_1min']:.1f} at the start, {end_load:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
