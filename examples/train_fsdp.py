"""Train the digits classifier with FSDP, resume its sharded checkpoint on another number of workers, and read it in
a plain process.

    python examples/train_fsdp.py --workers 2 --epochs 6

Each worker holds only its shard of the weights, gradients and Adam state (each Linear layer is its own FSDP unit).
Every checkpoint is a directory that all workers write their shards into; ``fit(ckpt_path=...)`` reshards it onto
any number of workers, and ``load_full_checkpoint`` reads it without Ray or workers.
"""

# ci-session: backend:fsdp  (where `nox` runs this example with --smoke; see noxfile.py)
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence

import pytorch_lightning as pl
from digits import DigitsClassifier, DigitsDataModule  # next to this script; the Ray workers import it too
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from raylane import get_strategy
from raylane_fsdp.checkpoint import load_full_checkpoint


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="Ray worker processes (default: 2)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default: 6)")
    parser.add_argument("--smoke", action="store_true", help="two epochs: a quick check that it runs (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule()
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    with tempfile.TemporaryDirectory() as root:
        # The first half of the epochs on `workers` workers, a sharded checkpoint after each epoch.
        strategy = get_strategy("fsdp", workers=args.workers, wrap_modules=[nn.Linear], idle_timeout=0)
        every_epoch = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        trainer = pl.Trainer(max_epochs=args.epochs // 2, strategy=strategy, callbacks=[every_epoch], **quiet)
        model = DigitsClassifier()
        trainer.fit(model, datamodule=data)
        halfway = every_epoch.format_checkpoint_name({"epoch": trainer.current_epoch - 1})  # the last one written
        print(f"{args.workers} workers, {args.epochs // 2} epochs: checkpoint directory {halfway}")

        # The rest on one worker, resharding that checkpoint (the weights come from it, not from `model`).
        strategy = get_strategy("fsdp", workers=1, wrap_modules=[nn.Linear], idle_timeout=0)
        trainer = pl.Trainer(max_epochs=args.epochs, strategy=strategy, enable_checkpointing=False, **quiet)
        resumed = DigitsClassifier()
        trainer.fit(resumed, datamodule=data, ckpt_path=halfway)
        (results,) = trainer.test(resumed, datamodule=data, verbose=False)
        print(f"resumed on 1 worker to epoch {trainer.current_epoch}: test accuracy {results['test_acc']:.2f}")

        # The sharded checkpoint, read in this process: no Ray, no workers, no process group.
        checkpoint = load_full_checkpoint(halfway)
        plain = DigitsClassifier(**checkpoint["hyper_parameters"])
        plain.load_state_dict(checkpoint["state_dict"])
        tester = pl.Trainer(accelerator="cpu", devices=1, **quiet)
        (results,) = tester.test(plain, datamodule=data, verbose=False)
    print(f"test accuracy of the epoch-{checkpoint['epoch'] + 1} checkpoint, one process: {results['test_acc']:.2f}")


if __name__ == "__main__":
    main()
