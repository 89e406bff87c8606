"""What every benchmark configuration trains: the digits example's MLP on generated, digits-shaped data.

Generated rather than the 1,797 real digits so that an epoch lasts seconds and start-up costs do not swamp the
training itself. Each process generates its own copy from the same seed, as a real job loads its own data, so no
configuration pays for shipping the data set to its workers. Imports only torch: Ray Train's workers load it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
DIGITS_PATH = EXAMPLES_DIR / "digits.py"

# Shape of scikit-learn's digits (as in examples/digits.py): 8x8 images flattened to 64 features, 10 classes.
NUM_FEATURES = 64
NUM_CLASSES = 10
NOISE = 2.0  # keeps the classes overlapping, so the loss still falls after the first epoch

PROCESSES = 2  # of every multi-process configuration: ddp_spawn, raylane, Ray Train


@dataclass(frozen=True)
class Workload:
    """One training run's size. ``batch_size`` is the global batch of one optimiser step, split across processes."""

    samples: int
    epochs: int
    batch_size: int
    hidden: int
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.samples, self.epochs, self.batch_size, self.hidden) < 1:
            raise ValueError(f"every workload size must be at least 1, got {self}")

    def batch_per_process(self, processes: int) -> int:
        """Each of ``processes`` ranks gets an equal share, so every configuration takes the same optimiser steps."""
        if self.batch_size % processes:
            raise ValueError(f"batch size {self.batch_size} does not split evenly over {processes} processes")
        return self.batch_size // processes

    @property
    def samples_trained(self) -> int:
        return self.samples * self.epochs

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def synthetic_digits(samples: int, seed: int) -> TensorDataset:
    """Gaussian clusters around one random centre per class: a learnable task of the digits' shape."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, NUM_FEATURES, generator=generator)
    labels = torch.randint(NUM_CLASSES, (samples,), generator=generator)
    features = centres[labels] + NOISE * torch.randn(samples, NUM_FEATURES, generator=generator)
    return TensorDataset(features, labels)
