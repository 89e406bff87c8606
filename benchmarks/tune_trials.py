"""Time a Ray Tune search over distributed Lightning trials: raylane-tune against Ray Train's TorchTrainer in Tune.

    python benchmarks/tune_trials.py --repeats 3 [--json tune_trials.json]
    python benchmarks/tune_trials.py --cluster --trials 32 --cpus 8 --epochs 1 --samples 512 --repeats 1

Run it on a machine doing nothing else: the report carries the 1-minute load average at the start and at the end.
Both configurations run the same search: ``--trials`` trials (a grid over the learning rate), each training the same
small Lightning MLP on ``--workers`` DDP workers for ``--epochs`` epochs and reporting its loss and a checkpoint to Tune
every epoch. Ray starts once with ``--cpus`` logical CPUs (default 4: exactly two trials' workers); ``tuner.fit()`` is
timed as the caller sees it, so worker start-up, scheduling and reporting all count. ``--cluster`` runs the same
search on a simulated multi-node cluster instead (Ray's own ``ray.cluster_utils.Cluster``: a driver-only head node
and ``--nodes`` nodes sharing the ``--cpus`` logical CPUs, all on this machine).

Every trial also reports, from rank 0, when its function started, when its first optimizer step ended and when each
report was made (``time.time()``): so the report has the time from ``Tuner.fit()`` to every trial's first step, each
trial's own start-up (function start to first step) and the scheduling overhead per trial: the trial slots' seconds
not spent training (``wall x slots - sum of the trials' training time``, over the trials; ``slots = cpus // workers``,
the trials whose workers the CPUs hold at once, the same for both configurations).

- raylane: ``tune.with_resources(fn, get_tune_resources("ddp", workers=W))``; the workers run in the trial's own
  placement group and the trial's process reserves nothing, so Tune runs as many trials at once as the CPUs hold.
- ray_train: the pattern of Ray Train V2's guide. Each trial is a Tune function (1 CPU, Tune's default) that runs a
  ``TorchTrainer``, whose workers reserve their own resources outside the trial. Without a cap, Tune starts trials
  until their drivers hold every CPU and no Train run can start (deadlock), so ``max_concurrent_trials`` is set to
  what fits: ``cpus // (1 + W * 1)``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from types import ModuleType
from typing import Any

import ray
from harness.report import describe_machine, installed_version, load_average, machine_and_load, publish
from ray import tune

CONFIGS = ("raylane", "ray_train")
DRIVER_CPUS_RAY_TRAIN = 1  # a Tune function trainable's default reservation
NUM_FEATURES, NUM_CLASSES = 64, 10
# What every trial reports besides its loss (time.time() on rank 0): see FirstStep.
TRIAL_STARTED, FIRST_STEP, REPORTED = "trial_started_at", "first_step_at", "reported_at"


def learning_rates(trials: int) -> list[float]:
    """The grid: 0.3, 0.1, 0.03, 0.01, ... one per trial."""
    return [(0.3 if i % 2 == 0 else 0.1) * 10 ** -(i // 2) for i in range(trials)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="searches per configuration; medians are reported")
    parser.add_argument("--trials", type=int, default=4, help="trials per search (default: 4)")
    parser.add_argument("--workers", type=int, default=2, help="DDP workers per trial (default: 2)")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs Ray starts with (default: 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial; one Tune report each (default: 2)")
    parser.add_argument("--samples", type=int, default=4096, help="generated training samples (default: 4096)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch per step (default: 128)")
    parser.add_argument("--hidden", type=int, default=256, help="width of the MLP's hidden layer (default: 256)")
    parser.add_argument("--cluster", action="store_true", help="run on a simulated multi-node cluster")
    parser.add_argument("--nodes", type=int, default=4, help="--cluster's nodes besides the driver's (default: 4)")
    parser.add_argument("--json", type=Path, help="also write the full results to this file")
    args = parser.parse_args(argv)
    if min(args.repeats, args.trials, args.workers, args.epochs, args.nodes) < 1:
        parser.error("--repeats, --trials, --workers, --epochs and --nodes must be at least 1")
    if args.cluster and (args.cpus % args.nodes or args.cpus // args.nodes < args.workers):
        parser.error("--cluster: --cpus must split evenly over --nodes, each node holding one trial's --workers")
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
    storage = Path(tempfile.mkdtemp(prefix="tune_trials_"))
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    load_before = load_average()
    try:
        with running_ray(args):
            # Round-robin, so a change in the machine's load spreads over both configurations.
            for repeat in range(args.repeats):
                for config in CONFIGS:
                    run = search(config, args.trials, workload, storage / f"{config}-{repeat}", ray_train_concurrency)
                    run["overhead_per_trial_s"] = overhead_per_trial(run, args.cpus // args.workers)
                    runs[config].append(run)
                    print(
                        f"[{repeat + 1}/{args.repeats}] {config}: {run['wall_s']:.1f} s for {args.trials} trials, "
                        f"at most {run['most_at_once']} at once, every first step after {max(run['first_step_s']):.1f} "
                        f"s, overhead {run['overhead_per_trial_s']:.1f} s/trial, best loss {run['best_loss']:.3f}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    report = summarise(runs, args, ray_train_concurrency, load_before)
    publish(report, format_report(report), args.json)
    return 0


@contextmanager
def running_ray(args: argparse.Namespace) -> Iterator[None]:
    """A fresh local Ray with ``--cpus`` CPUs, or with ``--cluster`` a driver-only head and ``--nodes`` nodes."""
    if args.cluster:
        from raylane.testing.cluster import local_cluster

        node = {"num_cpus": args.cpus // args.nodes, "object_store_memory": 256 * 2**20}
        with local_cluster(nodes=[node] * args.nodes):
            yield
        return
    # address="local": a fresh instance even when another Ray runs on this machine.
    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    try:
        yield
    finally:
        ray.shutdown()


def search(
    config: str, trials: int, workload: dict[str, Any], storage: Path, ray_train_concurrency: int
) -> dict[str, Any]:
    """One Tune search; returns its wall time, its trials' spans, first steps and training times, and the best loss."""
    param_space = {"lr": tune.grid_search(learning_rates(trials)), "workload": workload, "storage": str(storage)}
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
    fit_started, start = time.time(), time.perf_counter()
    results = tuner.fit()
    wall_s = time.perf_counter() - start
    if results.num_errors:
        raise RuntimeError(f"{config}: {results.num_errors} trial(s) failed: {[r.error for r in results if r.error]}")
    for result in results:
        if result.metrics["training_iteration"] != workload["epochs"]:
            raise RuntimeError(f"{config}: a trial reported {result.metrics['training_iteration']} times")
    reports = [result.metrics_dataframe for result in results]
    spans = [(float(df[TRIAL_STARTED].iloc[0]), float(df[REPORTED].iloc[-1])) for df in reports]
    first_steps = [float(df[FIRST_STEP].iloc[0]) for df in reports]
    return {
        "wall_s": wall_s,
        "most_at_once": _most_at_once(spans),
        "best_loss": float(results.get_best_result().metrics["loss"]),
        "trial_spans_s": [[begin - fit_started, end - fit_started] for begin, end in spans],
        # From Tuner.fit() to each trial's first optimizer step, and from each trial's function start to it.
        "first_step_s": [at - fit_started for at in first_steps],
        "trial_startup_s": [at - begin for at, (begin, _) in zip(first_steps, spans)],
        "training_s": [end - at for at, (_, end) in zip(first_steps, spans)],
    }


def overhead_per_trial(run: dict[str, Any], slots: int) -> float:
    """Trial-slot seconds not spent training, per trial: start-up, scheduling, reporting, waiting for a driver."""
    return (run["wall_s"] * slots - sum(run["training_s"])) / len(run["training_s"])


# -- what the trials run ----------------------------------------------------------------------------------------------


def raylane_trial(config: dict[str, Any]) -> None:
    """A Tune trial whose Trainer runs on raylane workers placed in the trial's own bundles."""
    started_at = time.time()  # its imports count as its start-up
    import pytorch_lightning as pl

    from raylane import get_strategy
    from raylane_tune import TuneReportCheckpointCallback

    workload = config["workload"]
    reported = {name: name for name in (TRIAL_STARTED, FIRST_STEP, REPORTED)}
    trainer = pl.Trainer(
        max_epochs=workload["epochs"],
        strategy=get_strategy("ddp", workers=workload["workers"]),
        callbacks=[
            _first_step(pl, started_at),
            TuneReportCheckpointCallback({"loss": "train_loss", **reported}, on="train_epoch_end"),
        ],
        **_QUIET,
    )
    trainer.fit(_classifier(pl)(config["lr"], workload["hidden"]), _loader(workload))


def ray_train_trial(config: dict[str, Any]) -> None:
    """A Tune trial that drives a Ray Train run (Ray Train V2's documented pattern)."""
    started_at = time.time()  # its imports count as its start-up
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config={**config, TRIAL_STARTED: started_at},
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
        callbacks=[_loss_alias(pl), _first_step(pl, config[TRIAL_STARTED]), RayTrainReportCallback()],
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


def _first_step(pl: ModuleType, trial_started_at: float) -> Any:
    """A callback: puts into ``callback_metrics`` (so into each report) when the trial's function started, when rank
    0 finished its first optimizer step (DDP's allreduce keeps the ranks together) and when the report is made."""
    import torch

    def as_metric(at: float) -> torch.Tensor:
        return torch.tensor(at, dtype=torch.float64)  # a float32 time.time() is only good to about 2 minutes

    class FirstStep(pl.Callback):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.first_step_at: float | None = None

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if self.first_step_at is None:
                self.first_step_at = time.time()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            trainer.callback_metrics[TRIAL_STARTED] = as_metric(trial_started_at)
            trainer.callback_metrics[FIRST_STEP] = as_metric(self.first_step_at or time.time())
            trainer.callback_metrics[REPORTED] = as_metric(time.time())

    return FirstStep()


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


def _most_at_once(spans: Sequence[tuple[float, float]]) -> int:
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)


def summarise(
    runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, ray_train_concurrency: int, load_before: float
) -> dict[str, Any]:
    configs = {
        name: {
            "wall_s": [run["wall_s"] for run in results],
            "median_wall_s": median(run["wall_s"] for run in results),
            "median_s_per_trial": median(run["wall_s"] for run in results) / args.trials,
            "most_at_once": max(run["most_at_once"] for run in results),
            "median_best_loss": median(run["best_loss"] for run in results),
            "median_every_first_step_s": median(max(run["first_step_s"]) for run in results),
            "median_first_step_s": median(median(run["first_step_s"]) for run in results),
            "median_trial_startup_s": median(median(run["trial_startup_s"]) for run in results),
            "median_overhead_per_trial_s": median(run["overhead_per_trial_s"] for run in results),
            "runs": results,
        }
        for name, results in runs.items()
    }
    machine = machine_and_load(load_before)
    for name in ("lightning", "raylane-tune"):
        machine[name] = installed_version(name)
    return {
        "machine": machine,
        "search": {
            "trials": args.trials,
            "workers_per_trial": args.workers,
            "ray_cpus": args.cpus,
            "cluster_nodes": args.nodes if args.cluster else None,
            "epochs": args.epochs,
            "samples": args.samples,
            "batch_size": args.batch_size,
            "hidden": args.hidden,
            "ray_train_max_concurrent_trials": ray_train_concurrency,
            "slots": args.cpus // args.workers,
        },
        "repeats": args.repeats,
        "configs": configs,
        "ratio_raylane_over_ray_train_wall": configs["raylane"]["median_wall_s"]
        / configs["ray_train"]["median_wall_s"],
    }


def format_report(report: dict[str, Any]) -> str:
    search_ = report["search"]
    where = (
        f"a simulated cluster of {search_['cluster_nodes']} nodes + a driver-only head, {search_['ray_cpus']} CPUs"
        if search_["cluster_nodes"]
        else f"one node, Ray with {search_['ray_cpus']} CPUs"
    )
    lines = [
        f"{search_['trials']} trials x {search_['workers_per_trial']} DDP workers, {search_['epochs']} epoch(s) of "
        f"{search_['samples']} samples each; {where}; medians of {report['repeats']} searches; "
        + describe_machine(report["machine"]),
        "",
        f"{'config':<10} {'wall s':>8} {'s/trial':>8} {'at once':>8} {'all 1st steps s':>16} {'1st step s':>11} "
        f"{'trial start-up s':>17} {'overhead s/trial':>17} {'best loss':>10}",
    ]
    for name, config in report["configs"].items():
        lines.append(
            f"{name:<10} {config['median_wall_s']:>8.1f} {config['median_s_per_trial']:>8.1f} "
            f"{config['most_at_once']:>8} {config['median_every_first_step_s']:>16.1f} "
            f"{config['median_first_step_s']:>11.1f} {config['median_trial_startup_s']:>17.1f} "
            f"{config['median_overhead_per_trial_s']:>17.1f} {config['median_best_loss']:>10.3f}"
        )
    raylane, ray_train = report["configs"]["raylane"], report["configs"]["ray_train"]
    lines += [
        "",
        f"raylane/ray_train: {report['ratio_raylane_over_ray_train_wall']:.2f}x the wall time, "
        f"{raylane['median_every_first_step_s'] / ray_train['median_every_first_step_s']:.2f}x the time to every "
        f"trial's first step, {raylane['median_overhead_per_trial_s'] / ray_train['median_overhead_per_trial_s']:.2f}x "
        f"the overhead per trial (Ray Train ran with max_concurrent_trials={search_['ray_train_max_concurrent_trials']}"
        f", what its 1-CPU trial drivers leave room for; slots = {search_['slots']})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
