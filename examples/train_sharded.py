"""Train the digits classifier with sharded optimizer state, then reload its best checkpoint in a plain process.

    python examples/train_sharded.py --workers 2 --epochs 10 --engine zero

Each worker keeps only its share of Adam's state (``engine="fairscale"`` also shards the gradients). The checkpoint
the run writes is an ordinary Lightning checkpoint: rank 0 gathers the shards into it, so it loads without Ray, without
raylane and on any number of workers.
"""

# ci-session: integration  (where `nox` runs this example with --smoke; see noxfile.py)
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence

import pytorch_lightning as pl
from digits import DigitsClassifier, DigitsDataModule  # next to this script; the Ray workers import it too
from pytorch_lightning.callbacks import ModelCheckpoint

from raylane import get_strategy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="Ray worker processes (default: 2)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument(
        "--engine", choices=("fairscale", "zero"), default="fairscale", help="sharding engine (default: fairscale)"
    )
    parser.add_argument("--smoke", action="store_true", help="one epoch: a quick check that it runs (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule()
    with tempfile.TemporaryDirectory() as root:
        best = ModelCheckpoint(dirpath=root, monitor="val_acc", mode="max")
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            strategy=get_strategy("sharded", workers=args.workers, engine=args.engine),
            callbacks=[best],
            enable_progress_bar=False,
            logger=False,
        )
        trainer.fit(DigitsClassifier(), datamodule=data)
        # The checkpoint callback on this process knows the file the workers wrote, and the file is here.
        print(f"best val accuracy {float(best.best_model_score):.2f} in {best.best_model_path}")

        restored = DigitsClassifier.load_from_checkpoint(best.best_model_path)
        plain = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        (results,) = plain.test(restored, datamodule=data, verbose=False)
    print(f"test accuracy of the reloaded checkpoint, one process, no Ray: {results['test_acc']:.2f}")


if __name__ == "__main__":
    main()
