"""The core's conformance suite on the default configuration (ZeRO stage 2), on CPU workers over gloo.

Only the reading of a checkpoint differs: DeepSpeed writes a directory per checkpoint (every rank its own shards),
which DeepSpeed's own converter consolidates.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raylane.testing import BackendConformance
from raylane_deepspeed.checkpoints import consolidated_state_dict


class TestDeepSpeedConformance(BackendConformance):
    backend = "deepspeed"  # stage 2 by default

    def checkpoint_weights(self, path: Path) -> dict[str, torch.Tensor]:
        return consolidated_state_dict(path)
