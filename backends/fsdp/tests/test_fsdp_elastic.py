"""Elastic worker counts with FSDP: a run sized below the most workers builds its mesh for the world size it got."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from raylane import ConfigurationError, get_strategy
from raylane.testing import ClassifierModel, assert_released, ensure_local_ray, make_loader
from raylane.testing.ray_state import TEST_CPUS

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("options", [{"tensor_parallel": 2}, {"hybrid_shard": 2}])
def test_a_mesh_that_some_counts_cannot_have_refuses_a_worker_range(options: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError, match=r"backend 'fsdp' cannot resume.*workers=4"):
        get_strategy("fsdp", workers=(2, 4), **options)


def test_a_run_that_starts_below_its_most_workers_shards_across_the_ones_it_got(tmp_path: Path) -> None:
    ensure_local_ray()
    # Everything but one CPU is taken, so only the fewest workers (one) fit.
    busy = placement_group([{"CPU": 1}] * (TEST_CPUS - 1), strategy="SPREAD")
    ray.get(busy.ready(), timeout=60)
    try:
        strategy = get_strategy("fsdp", workers=(1, 2), idle_timeout=0, grow_after_s=600)
        trainer = pl.Trainer(
            strategy=strategy,
            max_epochs=1,
            default_root_dir=str(tmp_path),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(ClassifierModel(report_dir=str(tmp_path)), make_loader(8, samples=32), make_loader(8, samples=16))
    finally:
        remove_placement_group(busy)
    [report] = [json.loads(path.read_text()) for path in tmp_path.glob("fit-rank*.json")]
    assert report["world_size"] == 1 and report["sampler_replicas"] == 1
    assert trainer.strategy.num_workers == 1 and trainer.current_epoch == 1
    assert_released()
