"""The core's conformance suite on the fsdp backend, with its default sharded (distributed-checkpoint) checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from raylane.testing import BackendConformance
from raylane_fsdp.checkpoint import load_full_checkpoint


class TestFSDPConformance(BackendConformance):
    backend = "fsdp"

    def checkpoint_weights(self, path: Path) -> dict[str, torch.Tensor]:
        assert path.is_dir(), "state_dict_type='sharded' (the default) writes a distributed-checkpoint directory"
        assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], "one file per rank"
        return load_full_checkpoint(path)["state_dict"]  # type: ignore[no-any-return]
