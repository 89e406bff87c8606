"""Time a Ray Tune search over distributed Lightning trials: raylane-tune against Ray Train's TorchTrainer in Tune.

    python benchmarks/tune_trials.py --repeats 3 [--json tune_trials.json]

Run it on a machine doing nothing else: the report carries the 1-minute load average at the start and at the end.
Both configurations run the same search: ``--trials`` trials (a grid over the learning rate), each training the same
small Lightning MLP on ``--workers`` DDP workers for ``--epochs`` epochs and reporting its loss and a checkpoint to Tune
every epoch. Ray starts once with ``--cpus`` logical CPUs (default 4: exactly two trials' workers); ``tuner.fit()`` is
timed as the caller sees it, so worker start-up, scheduling and reporting all count.

- raylane: ``tune.with_resources(fn, get_tune_resources("ddp", workers=W))``; the workers run in the trial's own
  placement group and the trial's process reserves nothing, so Tune runs as many trials at once as the CPUs hold.
- ray_train: the pattern of Ray Train V2's guide. Each trial is a Tune function (1 CPU, Tune's default) that runs a
  ``TorchTrainer``, whose workers reserve their own resources outside the trial. Without a cap, Tune starts trials
  until their drivers hold every CPU and no Train run can start (deadlock), so ``max_concurrent_trials`` is set to
  what fits: ``cpus // (1 + W * 1)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from types import ModuleType
from typing import Any

import ray
from ray import tune

CONFIGS = ("raylane", "ray_train")
DRIVER_CPUS_RAY_TRAIN = 1  # a Tune function trainable's default reservation
NUM_FEATURES, NUM_CLASSES = 64, 10
LRS = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="searches per configuration; medians are reported")
    parser.add_argument("--trials", type=int, default=4, help=f"trials per search, at most {len(LRS)} (default: 4)")
    parser.add_argument("--workers", type=int, default=2, help="DDP workers per trial (default: 2)")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs Ray starts with (default: 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial; one Tune report each (default: 2)")
    parser.add_argument("--samples", type=int, default=4096, help="generated training samples (default: 4096)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch per step (default: 128)")
    parser.add_argument("--hidden", type=int, default=256, help="width of the MLP's hidden layer (default: 256)")
    parser.add_argument("--json", type=Path, help="also write the full results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 1 <= args.trials <= len(LRS) or args.workers < 1 or args.epochs < 1:
        parser.error("--repeats, --workers and --epochs must be at least 1, and --trials between 1 and 8")
    if args.batch_size % args.workers:
        parser.error("--batch-size must split evenly over --workers")
    if args.cpus < args.workers + DRIVER_CPUS_RAY_TRAIN:
        parser.error(f"--cpus must hold one Ray Train trial: at least {args.workers + DRIVER_CPUS_RAY_TRAIN}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = {
        "epochs": args.epochs,
        "samples": args.samples,
        "batch_per_worker": args.batch_size // args.workers,
        "hidden": args.hidden,
        "workers": args.workers,
    }
    ray_train_concurrency = args.cpus // (DRIVER_CPUS_RAY_TRAIN + args.workers)
    # address="local": a fresh instance even when another Ray runs on this machine.
    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    storage = Path(tempfile.mkdtemp(prefix="tune_trials_"))
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    load_before = os.getloadavg()[0]
    try:
        # Round-robin, so a change in the machine's load spreads over both configurations.
        for repeat in range(args.repeats):
            for config in CONFIGS:
                run = search(config, args.trials, workload, storage / f"{config}-{repeat}", ray_train_concurrency)
                runs[config].append(run)
                print(
                    f"[{repeat + 1}/{args.repeats}] {config}: {run['wall_s']:.1f} s for {args.trials} trials, "
                    f"at most {run['most_at_once']} at once, best loss {run['best_loss']:.3f}",
                    flush=True,
                )
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    report = summarise(runs, args, ray_train_concurrency)
    report["machine"]["load_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    print()
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


def search(
    config: str, trials: int, workload: dict[str, Any], storage: Path, ray_train_concurrency: int
) -> dict[str, Any]:
    """One Tune search; returns its wall time, its trials' spans and the best loss."""
    param_space = {"lr": tune.grid_search(list(LRS[:trials])), "workload": workload, "storage": str(storage)}
    if config == "raylane":
        from raylane_tune import get_tune_resources

        trainable = tune.with_resources(raylane_trial, get_tune_resources("ddp", workers=workload["workers"]))
        concurrency = None  # Tune runs what the trials' placement groups let it
    else:
        trainable, concurrency = ray_train_trial, ray_train_concurrency
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="loss", mode="min", max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(storage_path=str(storage), name=config, verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall_s = time.perf_counter() - start
    if results.num_errors:
        raise RuntimeError(f"{config}: {results.num_errors} trial(s) failed: {[r.error for r in results if r.error]}")
    spans = [_span(result.metrics_dataframe) for result in results]
    for result in results:
        if result.metrics["training_iteration"] != workload["epochs"]:
            raise RuntimeError(f"{config}: a trial reported {result.metrics['training_iteration']} times")
    return {
        "wall_s": wall_s,
        "most_at_once": _most_at_once(spans),
        "best_loss": float(results.get_best_result().metrics["loss"]),
        "trial_spans_s": [[start_ - min(s for s, _ in spans), end - min(s for s, _ in spans)] for start_, end in spans],
    }


# -- what the trials run ----------------------------------------------------------------------------------------------


def raylane_trial(config: dict[str, Any]) -> None:
    """A Tune trial whose Trainer runs on raylane workers placed in the trial's own bundles."""
    import pytorch_lightning as pl

    from raylane import get_strategy
    from raylane_tune import TuneReportCheckpointCallback

    workload = config["workload"]
    trainer = pl.Trainer(
        max_epochs=workload["epochs"],
        strategy=get_strategy("ddp", workers=workload["workers"]),
        callbacks=[TuneReportCheckpointCallback({"loss": "train_loss"}, on="train_epoch_end")],
        **_QUIET,
    )
    trainer.fit(_classifier(pl)(config["lr"], workload["hidden"]), _loader(workload))


def ray_train_trial(config: dict[str, Any]) -> None:
    """A Tune trial that drives a Ray Train run (Ray Train V2's documented pattern)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=config["workload"]["workers"], use_gpu=False),
        run_config=RunConfig(
            name=f"train-{tune.get_context().get_trial_id()}",
            storage_path=config["storage"],
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _ray_train_worker(config: dict[str, Any]) -> None:
    """Each Ray Train worker: the same model on Ray Train's Lightning integration (``lightning.pytorch``)."""
    import lightning.pytorch as pl
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    workload = config["workload"]
    trainer = pl.Trainer(
        max_epochs=workload["epochs"],
        accelerator="cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[_loss_alias(pl), RayTrainReportCallback()],
        **_QUIET,
    )
    trainer = prepare_trainer(trainer)
    trainer.fit(_classifier(pl)(config["lr"], workload["hidden"]), _loader(workload))


_QUIET: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "logger": False,
    "enable_model_summary": False,
}


def _classifier(pl: ModuleType) -> type:
    """The MLP as a LightningModule of the given Lightning package (raylane: pytorch_lightning; Ray Train:
    lightning.pytorch, whose Trainer rejects the other package's modules)."""
    import torch
    from torch import nn

    class Classifier(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self, lr: float, hidden: int) -> None:
            super().__init__()
            self.lr = lr
            self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            loss = nn.functional.cross_entropy(self.net(inputs), targets)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return Classifier


def _loss_alias(pl: ModuleType) -> Any:
    """A callback: Ray Train reports callback_metrics as they are, so name the loss "loss" as raylane's mapping does."""

    class RenameLoss(pl.Callback):  # type: ignore[misc, name-defined]
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            trainer.callback_metrics["loss"] = trainer.callback_metrics["train_loss"]

    return RenameLoss()


def _loader(workload: dict[str, Any]) -> Any:
    """Gaussian clusters around one random centre per class, generated by every worker from the same seed."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(NUM_CLASSES, NUM_FEATURES, generator=generator)
    labels = torch.randint(NUM_CLASSES, (workload["samples"],), generator=generator)
    features = centres[labels] + 2.0 * torch.randn(workload["samples"], NUM_FEATURES, generator=generator)
    return DataLoader(TensorDataset(features, labels), batch_size=workload["batch_per_worker"], shuffle=True)


# -- the report -------------------------------------------------------------------------------------------------------


def _span(metrics: Any) -> tuple[float, float]:
    # From the trial's start (first report's timestamp minus its running time) to its last report.
    first, last = metrics.iloc[0], metrics.iloc[-1]
    return float(first["timestamp"] - first["time_total_s"]), float(last["timestamp"])


def _most_at_once(spans: Sequence[tuple[float, float]]) -> int:
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)


def summarise(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, ray_train_concurrency: int) -> dict:
    configs = {
        name: {
            "wall_s": [run["wall_s"] for run in results],
            "median_wall_s": median(run["wall_s"] for run in results),
            "median_s_per_trial": median(run["wall_s"] for run in results) / args.trials,
            "most_at_once": max(run["most_at_once"] for run in results),
            "median_best_loss": median(run["best_loss"] for run in results),
            "runs": results,
        }
        for name, results in runs.items()
    }
    return {
        "machine": _machine(),
        "search": {
            "trials": args.trials,
            "workers_per_trial": args.workers,
            "ray_cpus": args.cpus,
            "epochs": args.epochs,
            "samples": args.samples,
            "batch_size": args.batch_size,
            "hidden": args.hidden,
            "ray_train_max_concurrent_trials": ray_train_concurrency,
        },
        "repeats": args.repeats,
        "configs": configs,
        "ratio_raylane_over_ray_train_wall": configs["raylane"]["median_wall_s"]
        / configs["ray_train"]["median_wall_s"],
    }


def _machine() -> dict[str, Any]:
    import platform
    from importlib import metadata

    versions = {}
    for name in ("torch", "pytorch-lightning", "lightning", "ray", "raylane", "raylane-ddp", "raylane-tune"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def format_report(report: dict[str, Any]) -> str:
    search_ = report["search"]
    load = report["machine"]["load_1min"]
    lines = [
        f"{search_['trials']} trials x {search_['workers_per_trial']} DDP workers, {search_['epochs']} epochs of "
        f"{search_['samples']} samples each; Ray with {search_['ray_cpus']} CPUs on {report['machine']['cpu_cores']} "
        f"cores; medians of {report['repeats']} searches; 1-minute load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end",
        "",
        f"{'config':<10} {'wall s':>8} {'s/trial':>8} {'at once':>8} {'best loss':>10}",
    ]
    for name, config in report["configs"].items():
        lines.append(
            f"{name:<10} {config['median_wall_s']:>8.1f} {config['median_s_per_trial']:>8.1f} "
            f"{config['most_at_once']:>8} {config['median_best_loss']:>10.3f}"
        )
    lines += [
        "",
        f"raylane/ray_train: {report['ratio_raylane_over_ray_train_wall']:.2f}x the wall time "
        f"(Ray Train ran with max_concurrent_trials={search_['ray_train_max_concurrent_trials']}, what its 1-CPU trial "
        "drivers leave room for)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
