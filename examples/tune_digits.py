"""Search the digits classifier's learning rate and width with Ray Tune, each trial plain or distributed.

    python examples/tune_digits.py --workers 0    # each trial trains in its own process (a plain Trainer)
    python examples/tune_digits.py --workers 2    # each trial trains on 2 raylane workers of its own

With workers, ``get_tune_resources`` reserves each trial's workers together with the trial as one placement group,
so Tune starts a trial only when all its workers fit and the other trials wait in Tune's queue. Rank 0's metrics and
checkpoints reach Tune through the report callback, so the ASHA scheduler can stop poor trials early.
"""

# ci-session: tune  (where `nox` runs this example with --smoke; see noxfile.py)
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from digits import DigitsClassifier, DigitsDataModule  # next to this script; the trials and workers import it too
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raylane import get_strategy
from raylane_tune import TuneReportCheckpointCallback, get_tune_resources

SEARCH_SPACE = {"lr": tune.grid_search([1e-3, 1e-2]), "hidden": tune.grid_search([32, 128])}
REPORTED = {"accuracy": "val_acc"}  # the name Tune sees -> the name the model logs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="raylane workers per trial; 0 trains in the trial")
    parser.add_argument("--epochs", type=int, default=6, help="most training epochs per trial (default: 6)")
    parser.add_argument("--smoke", action="store_true", help="one trial of one epoch: a quick check that it runs (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    return args


def train_trial(config: dict[str, Any], workers: int, epochs: int) -> None:
    """One trial: train with this trial's hyperparameters; every validation is one report to Tune."""
    placement: dict[str, Any] = (
        {"strategy": get_strategy("ddp", workers=workers)} if workers else {"accelerator": "cpu", "devices": 1}
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[TuneReportCheckpointCallback(REPORTED, on="validation_end")],
        enable_progress_bar=False,
        enable_checkpointing=False,  # Tune keeps the checkpoints the callback reports
        logger=False,
        **placement,
    )
    trainer.fit(DigitsClassifier(hidden=config["hidden"], lr=config["lr"]), datamodule=DigitsDataModule())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    trainable = tune.with_parameters(train_trial, workers=args.workers, epochs=args.epochs)
    if args.workers:  # the trial itself reserves nothing; its workers' bundles follow it in one placement group
        trainable = tune.with_resources(trainable, get_tune_resources("ddp", workers=args.workers))
    tuner = tune.Tuner(
        trainable,
        param_space={"lr": 1e-2, "hidden": 32} if args.smoke else SEARCH_SPACE,  # a smoke run: one trial
        tune_config=tune.TuneConfig(
            metric="accuracy", mode="max", scheduler=ASHAScheduler(max_t=args.epochs, grace_period=min(2, args.epochs))
        ),
    )
    best = tuner.fit().get_best_result()
    print(f"best trial: {best.config} with val accuracy {best.metrics['accuracy']:.2f}")
    with best.checkpoint.as_directory() as directory:  # the report callback saved it as the file "checkpoint"
        model = DigitsClassifier.load_from_checkpoint(os.path.join(directory, "checkpoint"))
    print(f"its checkpoint loads on the driver: hidden={model.hparams.hidden}, lr={model.hparams.lr}")


if __name__ == "__main__":
    main()
