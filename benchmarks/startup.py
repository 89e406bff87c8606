"""Where ``trainer.fit()`` spends its time before every worker's first optimizer step, against Lightning's
``ddp_spawn`` and Ray Train, what a ``test()`` after ``fit()`` adds when the workers stay warm, what the fit of a
later Trainer of the same driver costs (it trains on the earlier Trainer's idle workers, whether the earlier one is
still alive or was dropped and collected), and what ``fit()`` costs when
the script spent long enough between building the Trainer and calling ``fit()`` (loading its data) for the workers
raylane starts at the Trainer's construction to be up.

    python benchmarks/startup.py --repeats 5 [--without-ray-train] [--json startup.json]

Ray runs before any timing (as on a cluster). Short training on purpose (4,096 samples, one epoch): here start-up is
the figure. See README.md.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import ray
from harness import lightning_runs, ray_train_runs
from harness.report import RunResult, describe_machine, load_average, machine_and_load, publish, ratio_lines
from harness.timer import TEST_LOOP_S, measured
from harness.workload import PROCESSES, Workload

import raylane

WARM_IDLE_TIMEOUT_S = 60.0
LATER_TRAINER = "raylane_later_trainer"  # a second Trainer's fit, right after a first one's, on its idle workers
AFTER_A_DROPPED_TRAINER = "raylane_after_dropped"  # the same once the first Trainer was dropped and collected
BUILT_EARLY = "raylane_built_early"  # fit() once the workers started at the Trainer's construction are up
# (label, configuration, figure, goal: the most it may take as a multiple of ddp_spawn's), from issue 16
GOALS = (
    ("fit(), Ray running, Trainer built right before", "raylane", "median_fit_s", 0.5),
    ("fit(), Ray running, workers up before fit()", BUILT_EARLY, "median_fit_s", 0.5),
    ("first step, Ray running, Trainer built right before", "raylane", "median_first_step_s", 0.5),
    ("first step, Ray running, workers up before fit()", BUILT_EARLY, "median_first_step_s", 0.5),
)
LATER_TRAINER_GOAL_S = 1.0  # a later Trainer's first step, seconds after its fit() was called
# Start-up phases of a raylane fit, in order: (label, where the mark comes from, its name). "workers" marks are the
# latest over the ranks: a phase ends when every worker has passed it.
PHASES = (
    ("payload in the object store", "driver", "payload_stored"),
    ("placement group ready", "driver", "placement_ready"),
    ("imports done on every worker", "workers", "imports_done"),
    ("actors alive (placements known)", "driver", "actors_alive"),
    ("entry point sent", "driver", "entry_point_sent"),
    ("model loaded on every worker", "workers", "payload_loaded"),
    ("process group up", "workers", "process_group_up"),
    ("first optimizer step on every worker", "run", "first_step_at"),
    ("outputs back on the driver", "driver", "outputs_received"),
    ("workers released", "driver", "workers_released_or_kept"),
    ("fit() returned", "run", "returned_at"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each configuration; medians are reported")
    parser.add_argument("--samples", type=int, default=4096, help="generated training samples (default: 4096)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the MLP's hidden layer (default: 1024)")
    parser.add_argument("--without-ray-train", action="store_true", help="leave Ray Train's TorchTrainer out")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(samples=args.samples, epochs=1, batch_size=256, hidden=args.hidden)
    configs = ["ddp_spawn", "raylane", BUILT_EARLY, LATER_TRAINER, AFTER_A_DROPPED_TRAINER]
    if not args.without_ray_train:
        try:
            ray_train_runs.check_available()
        except ray_train_runs.RayTrainUnavailable as err:
            print(f"error: {err} (or pass --without-ray-train)", file=sys.stderr)
            return 2
        configs.append(ray_train_runs.CONFIG)
    load_at_start = load_average()
    ray.init(address="local", num_cpus=PROCESSES, logging_level=logging.WARNING)
    storage = tempfile.mkdtemp(prefix="startup_ray_train_")
    fits: dict[str, list[RunResult]] = {config: [] for config in configs}
    phases: list[dict[str, float]] = []
    tests: dict[str, list[float]] = {"warm": [], "cold": []}
    try:
        for repeat in range(args.repeats):  # round-robin: load changes spread over every configuration
            for config in configs:
                if config == ray_train_runs.CONFIG:
                    result = ray_train_runs.run(workload, storage)
                elif config == "raylane":
                    result, run_phases = fit_raylane(workload)
                    phases.append(run_phases)
                elif config == BUILT_EARLY:
                    result, _ = fit_raylane(workload, workers_up_first=True)
                elif config in (LATER_TRAINER, AFTER_A_DROPPED_TRAINER):
                    result = fit_a_later_trainer(workload, drop_the_first=config == AFTER_A_DROPPED_TRAINER)
                else:
                    result = lightning_runs.run(config, workload)
                fits[config].append(result)
                print(
                    f"[{repeat + 1}/{args.repeats}] {config}: fit {result.fit_s:.2f} s, first step after "
                    f"{result.first_step_s:.2f} s",
                    flush=True,
                )
            for kind, idle_timeout in (("warm", WARM_IDLE_TIMEOUT_S), ("cold", 0.0)):
                tests[kind].append(test_after_fit(workload, idle_timeout))
                print(
                    f"[{repeat + 1}/{args.repeats}] test() after fit(), {kind} workers: "
                    f"{tests[kind][-1]:.2f} s beyond the test loop",
                    flush=True,
                )
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    report = summarise(fits, phases, tests, workload, load_at_start)
    publish(report, format_report(report), args.json)
    return 0


def fit_raylane(workload: Workload, workers_up_first: bool = False) -> tuple[RunResult, dict[str, float]]:
    """One raylane fit with its start-up phases: seconds from calling ``fit()`` to the end of each phase.

    ``workers_up_first``: wait, before timing, until the workers raylane starts when the Trainer is built are up, as
    they are when the script loads its data for that long."""
    trainer, model, data = lightning_runs.build("raylane", workload)
    if workers_up_first and not trainer.strategy.launcher.early_workers_ready(timeout_s=600):
        raise RuntimeError("the workers raylane starts with the Trainer did not start; see the log above")
    started_at, start = time.time(), time.perf_counter()
    try:
        trainer.fit(model, datamodule=data)
        fit_s = time.perf_counter() - start
        returned_at = time.time()
    finally:
        lightning_runs.release_workers(trainer)
    metrics = measured(trainer.callback_metrics)
    timeline = trainer.strategy.launcher.timeline
    sources = {
        "driver": timeline["driver"],
        "run": {"first_step_at": metrics["first_step_at"], "returned_at": returned_at},
        "workers": {name: max(marks.get(name, 0.0) for marks in timeline["workers"]) for _, _, name in PHASES},
    }
    phases = {label: sources[source][name] - started_at for label, source, name in PHASES if name in sources[source]}
    return RunResult.from_metrics(fit_s, metrics, started_at), phases


def fit_a_later_trainer(workload: Workload, drop_the_first: bool = False) -> RunResult:
    """A second Trainer's fit right after a first one's, on the first one's idle workers: a re-run notebook cell (the
    first Trainer still alive), or a loop over settings that builds each Trainer in a function (the first one dropped,
    and collected before the second is built)."""
    try:
        first, model, data = lightning_runs.build("raylane", workload, idle_timeout=WARM_IDLE_TIMEOUT_S)
        first.fit(model, datamodule=data)
        if drop_the_first:
            del first
            gc.collect()
        second, model, data = lightning_runs.build("raylane", workload, idle_timeout=WARM_IDLE_TIMEOUT_S)
        started_at, start = time.time(), time.perf_counter()
        second.fit(model, datamodule=data)
        fit_s = time.perf_counter() - start
    finally:
        raylane.release_idle_workers()  # both Trainers', the dropped one's included
    return RunResult.from_metrics(fit_s, measured(second.callback_metrics), started_at)


def test_after_fit(workload: Workload, idle_timeout: float) -> float:
    """Seconds a ``test()`` right after ``fit()`` on the same Trainer takes beyond rank 0's test loop."""
    trainer, model, data = lightning_runs.build("raylane", workload, idle_timeout=idle_timeout)
    try:
        trainer.fit(model, datamodule=data)
        start = time.perf_counter()
        trainer.test(model, datamodule=data, verbose=False)
        test_s = time.perf_counter() - start
    finally:
        lightning_runs.release_workers(trainer)
    return test_s - float(trainer.callback_metrics[TEST_LOOP_S])


def summarise(
    fits: Mapping[str, Sequence[RunResult]],
    phases: Sequence[Mapping[str, float]],
    tests: Mapping[str, Sequence[float]],
    workload: Workload,
    load_at_start: float,
) -> dict[str, Any]:
    configs = {
        name: {
            "fit_s": [r.fit_s for r in results],
            "first_step_s": [r.first_step_s for r in results],
            "median_fit_s": median(r.fit_s for r in results),
            "median_first_step_s": median(r.first_step_s for r in results),
            "median_loop_s": median(r.loop_s for r in results),
        }
        for name, results in fits.items()
    }
    return {
        "machine": machine_and_load(load_at_start),
        "workload": workload.as_dict(),
        "repeats": len(phases),
        "configs": configs,
        # A phase that ended before fit() was called (workers started with the Trainer) has no mark in this fit.
        "raylane_phases_median_s": {
            label: median(p[label] for p in phases if label in p)
            for label, *_ in PHASES
            if any(label in p for p in phases)
        },
        "test_after_fit_extra_s": {kind: {"runs": list(v), "median": median(v)} for kind, v in tests.items()},
    }


def goal_lines(configs: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Each issue-16 goal: the configuration's median over ddp_spawn's, or the later Trainer's first step."""
    lines = []
    for label, config, key, goal in GOALS:
        ratio = configs[config][key] / configs["ddp_spawn"][key]
        lines.append(
            f"{label}: {ratio:.2f}x ddp_spawn (goal at most {goal:g}x: {'met' if ratio <= goal else 'not met'})"
        )
    for config, which in ((LATER_TRAINER, "the earlier one alive"), (AFTER_A_DROPPED_TRAINER, "the earlier dropped")):
        later = configs[config]["median_first_step_s"]
        verdict = "met" if later < LATER_TRAINER_GOAL_S else "not met"
        lines.append(
            f"later Trainer ({which}), fit() to the first step: {later:.2f} s "
            f"(goal under {LATER_TRAINER_GOAL_S:g} s: {verdict})"
        )
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    machine, workload = report["machine"], report["workload"]
    lines = [
        f"{workload['samples']} samples x 1 epoch, hidden {workload['hidden']}; medians of {report['repeats']} runs; "
        + describe_machine(machine),
        "",
        "config                 fit s  first step s  loop s",
    ]
    for name, config in report["configs"].items():
        lines.append(
            f"{name:<21} {config['median_fit_s']:6.2f} {config['median_first_step_s']:13.2f} "
            f"{config['median_loop_s']:7.2f}"
        )
    lines += ["", *ratio_lines(report["configs"], ("median_fit_s", "median_first_step_s")), ""]
    lines += [*goal_lines(report["configs"]), ""]
    lines.append("raylane start-up, seconds after fit() was called (median):")
    lines += [f"  {seconds:6.2f}  {label}" for label, seconds in report["raylane_phases_median_s"].items()]
    extra = report["test_after_fit_extra_s"]
    lines += [
        "",
        f"test() after fit() beyond the test loop: {extra['warm']['median']:.2f} s with warm workers "
        f"(idle_timeout={WARM_IDLE_TIMEOUT_S:g}), {extra['cold']['median']:.2f} s with idle_timeout=0 (fresh workers)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # ddp_spawn's children re-import this file; they must not run the benchmark
    sys.exit(main())
