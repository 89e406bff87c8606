"""The optional configuration: Ray Train's ``TorchTrainer`` running the same Lightning model (``--with-ray-train``).

Ray Train's Lightning integration is built on the ``lightning`` package when that is installed, and
``lightning.pytorch``'s classes are not ``pytorch_lightning``'s: its Trainer rejects a ``pytorch_lightning``
LightningModule. So each Ray Train worker executes examples/digits.py (and the loop timer) once more with
``pytorch_lightning`` resolving to the package Ray Train uses: the same source, bound to the other package.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.report import RunResult
from harness.workload import DIGITS_PATH, PROCESSES, Workload, synthetic_digits

CONFIG = "ray_train"
LOOP_TIMER_PATH = Path(__file__).resolve().parent / "timer.py"


class RayTrainUnavailable(RuntimeError):
    """Ray Train, or its Lightning integration, cannot run in this environment."""


def check_available() -> None:
    """Fail before any other configuration runs, saying what is missing."""
    try:
        import ray.train.lightning
        import ray.train.torch  # noqa: F401
    except ImportError as err:
        raise RayTrainUnavailable(
            "--with-ray-train needs Ray Train and its Lightning integration "
            f"(pip install 'ray[train]' lightning): {type(err).__name__}: {err}"
        ) from err


def run(workload: Workload, storage_path: str) -> RunResult:
    """Time ``TorchTrainer.fit()`` on ``PROCESSES`` workers, the counterpart of raylane's ``trainer.fit()``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop,  # type: ignore[arg-type]  # annotated as returning None, yet v2 hands back rank 0's return value
        train_loop_config={"workload": workload},
        scaling_config=ScalingConfig(num_workers=PROCESSES, use_gpu=False),
        run_config=RunConfig(storage_path=storage_path),
    )
    started_at, start = time.time(), time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:
        raise RayTrainUnavailable(f"Ray Train's TorchTrainer failed here: {type(err).__name__}: {err}") from err
    fit_s = time.perf_counter() - start
    # Ray Train's v2 API hands back rank 0's return value; the v1 API only the last reported metrics.
    metrics: dict[str, float] | None = getattr(result, "return_value", None) or result.metrics
    if not metrics:
        raise RayTrainUnavailable("Ray Train's TorchTrainer returned neither the loop's return value nor its metrics")
    return RunResult.from_metrics(fit_s, metrics, started_at)


def _train_loop(config: dict[str, Any]) -> dict[str, float]:
    """Runs on every Ray Train worker."""
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
    from torch.utils.data import DataLoader

    workload: Workload = config["workload"]
    pl = _ray_train_lightning()
    digits = _load_on(DIGITS_PATH, pl)
    loop_timer = _load_on(LOOP_TIMER_PATH, pl)
    pl.seed_everything(workload.seed, verbose=False)
    model = digits.DigitsClassifier(hidden=workload.hidden)
    loader = DataLoader(
        synthetic_digits(workload.samples, workload.seed),
        batch_size=workload.batch_per_process(PROCESSES),
        shuffle=True,
    )
    trainer = pl.Trainer(
        max_epochs=workload.epochs,
        accelerator="cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[loop_timer.LoopTimer()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
        enable_model_summary=False,
    )
    trainer = prepare_trainer(trainer)
    trainer.fit(model, train_dataloaders=loader)
    measured = loop_timer.measured(trainer.callback_metrics)
    ray.train.report(measured)
    return measured


def _ray_train_lightning() -> ModuleType:
    """The Lightning package Ray Train's integration uses: ``lightning.pytorch`` when installed, as Ray prefers it."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ModuleNotFoundError:
        return importlib.import_module("pytorch_lightning")


def _load_on(path: Path, package: ModuleType) -> ModuleType:
    """Execute the module at ``path`` with ``import pytorch_lightning`` resolving to ``package``."""
    name = f"{path.stem}_on_{package.__name__.replace('.', '_')}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("pytorch_lightning")
    sys.modules["pytorch_lightning"] = package
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        if previous is None:
            del sys.modules["pytorch_lightning"]
        else:
            sys.modules["pytorch_lightning"] = previous
    return module
