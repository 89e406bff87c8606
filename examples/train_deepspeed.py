"""Train the digits classifier with DeepSpeed ZeRO, then reload its best checkpoint in a plain process.

    python examples/train_deepspeed.py --workers 2 --epochs 10 --stage 3

With ``--stage 3`` each worker holds only its partition of the weights, gradients and Adam state. DeepSpeed saves
each checkpoint as a directory of per-rank shards; Lightning's converter turns the best one into an ordinary
checkpoint file, which loads without Ray, without raylane and without DeepSpeed's engine.
"""

# ci-session: backend:deepspeed  (where `nox` runs this example with --smoke; see noxfile.py)
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from digits import DigitsClassifier, DigitsDataModule  # next to this script; the Ray workers import it too
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

from raylane import get_strategy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="Ray worker processes (default: 2)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3, help="ZeRO stage (default: 3)")
    parser.add_argument("--offload", action="store_true", help="keep optimizer state (stage 3: weights too) in CPU RAM")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default: CPU workers (gloo)")
    parser.add_argument("--smoke", action="store_true", help="one epoch: a quick check that it runs (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule()
    offload = {"offload_optimizer": True, "offload_parameters": args.stage == 3} if args.offload else {}
    strategy = get_strategy("deepspeed", workers=args.workers, use_gpu=args.gpu, stage=args.stage, **offload)
    with tempfile.TemporaryDirectory() as root:
        best = ModelCheckpoint(dirpath=root, monitor="val_acc", mode="max")
        trainer = pl.Trainer(
            max_epochs=args.epochs, strategy=strategy, callbacks=[best], enable_progress_bar=False, logger=False
        )
        model = DigitsClassifier()
        trainer.fit(model, datamodule=data)
        # `model` holds the full weights now (gathered from the ZeRO-3 partitions); the best checkpoint is a directory.
        print(f"best val accuracy {float(best.best_model_score):.2f} in {best.best_model_path}/")

        single_file = str(Path(root) / "best-single-file.ckpt")
        convert_zero_checkpoint_to_fp32_state_dict(best.best_model_path, single_file)
        restored = DigitsClassifier.load_from_checkpoint(single_file)
        plain = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        (results,) = plain.test(restored, datamodule=data, verbose=False)
    print(f"test accuracy of the reloaded checkpoint, one process, no Ray: {results['test_acc']:.2f}")


if __name__ == "__main__":
    main()
