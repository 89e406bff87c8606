"""Train a digits classifier on Ray workers with raylane, then test it.

    python examples/train_digits.py --workers 2 --epochs 10

Ray starts locally when no cluster is running. ``fit`` starts the worker actors and ``test`` reuses them while they are
warm; after ``fit`` the model in this process holds the trained weights, which is why ``test`` scores the model just
trained.
"""

# ci-session: integration  (where `nox` runs this example with --smoke; see noxfile.py)
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import pytorch_lightning as pl
from digits import DigitsClassifier, DigitsDataModule  # next to this script; the Ray workers import it too

from raylane import get_strategy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="Ray worker processes (default: 2)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size per worker (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and the initial weights")
    parser.add_argument("--smoke", action="store_true", help="one epoch: a quick check that it runs (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)  # the workers inherit this process's seeded RNG state
    model = DigitsClassifier()
    data = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        strategy=get_strategy("ddp", workers=args.workers),  # test() reuses the warm workers
        enable_progress_bar=False,
        enable_checkpointing=False,  # nothing worth keeping from a run this short
        logger=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    print(
        f"trained {args.epochs} epochs on {args.workers} workers in {time.perf_counter() - start:.1f} s; "
        f"val accuracy: {float(trainer.callback_metrics['val_acc']):.2f}"
    )
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    print(f"test accuracy: {results['test_acc']:.2f}")


if __name__ == "__main__":
    main()
