"""Train the digits classifier with Horovod on Ray workers, then predict on the driver's test split.

    python examples/train_horovod.py --workers 2 --epochs 10 --compression fp16

Needs Horovod, which raylane-horovod builds for the installed torch (``python -m raylane_horovod.build_horovod
--install``). The workers meet through Horovod's Gloo controller: no MPI, no ``horovodrun``. ``predict`` returns every
worker's predictions to this process in dataset order, so they line up with the labels here.
"""

# ci-session: backend:horovod  (where `nox` runs this example with --smoke; see noxfile.py)
from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from digits import Batch, DigitsClassifier, DigitsDataModule  # next to this script; the Ray workers import it too
from torch import Tensor

from raylane import get_strategy


class DigitsPredictor(DigitsClassifier):
    """The classifier, answering ``predict`` with class labels (batches hold features and labels)."""

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        features, _ = batch
        return self(features).argmax(dim=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="Ray worker processes (default: 2)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument(
        "--compression", choices=("none", "fp16"), default="none", help="gradients on the wire (default: none)"
    )
    parser.add_argument("--smoke", action="store_true", help="one epoch: a quick check that it runs (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(0, verbose=False)
    model = DigitsPredictor()
    data = DigitsDataModule()
    strategy = get_strategy("horovod", workers=args.workers, compression=args.compression)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        strategy=strategy,  # predict() reuses the warm workers fit() started
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(model, datamodule=data)

    data.setup("predict")  # the driver needs the labels to score the predictions
    predictions = torch.cat(trainer.predict(model, dataloaders=data.test_dataloader()))
    labels = data.test_set.tensors[1]
    accuracy = (predictions == labels).float().mean()
    print(f"{len(predictions)} predictions back on the driver; accuracy {float(accuracy):.2f}")


if __name__ == "__main__":
    main()
