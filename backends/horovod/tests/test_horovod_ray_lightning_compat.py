"""raylane.compat.HorovodRayStrategy: ray_lightning's arguments on the horovod backend (needs Horovod installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from raylane import ConfigurationError
from raylane.compat import HorovodRayStrategy
from raylane.testing import ClassifierModel, ensure_local_ray, make_loader

pytest.importorskip("horovod.torch", reason="the horovod nox session builds Horovod; see build_horovod.py")


def test_ray_lightning_arguments_become_the_horovod_reservation() -> None:
    strategy = HorovodRayStrategy(2, 3, False)
    assert strategy.backend_name == "horovod"
    options = strategy.launch_options
    assert (options.workers, options.cpus_per_worker, options.gpus) == (2, 3, 0)
    assert HorovodRayStrategy(num_workers=1, use_gpu=True).launch_options.gpus == 1


def test_horovod_options_pass_through_and_unknown_ones_fail() -> None:
    assert HorovodRayStrategy(num_workers=2, compression="fp16").backend_options == {"compression": "fp16"}
    with pytest.raises(ConfigurationError, match="Valid options are"):
        HorovodRayStrategy(num_workers=2, num_hosts=2)


@pytest.mark.timeout(240)
def test_horovod_ray_strategy_with_two_workers_trains(tmp_path: Path) -> None:
    ensure_local_ray()
    torch.manual_seed(0)
    model = ClassifierModel()
    initial = model.layer.weight.detach().clone()
    trainer = pl.Trainer(
        strategy=HorovodRayStrategy(num_workers=2),
        max_epochs=2,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, make_loader(8, samples=64), make_loader(8, samples=32))

    assert trainer.state.finished and trainer.current_epoch == 2 and trainer.global_step == 8
    assert not torch.equal(initial, model.layer.weight)
    saved = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["layer.weight"], model.layer.weight)
