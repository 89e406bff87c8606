"""What a backend and Lightning's registry give a process that imported one namespace (then both), as a JSON line.

raylane is imported before Lightning here, the order that needs raylane to watch for Lightning's import.

``python namespace_checks.py lightning.pytorch``: run in a fresh interpreter, because which Lightning a process has
imported is what raylane goes by, and a test process may have imported both.
"""

from __future__ import annotations

import importlib
import json
import pickle
import sys
from typing import Any

# raylane first: Lightning's registry and class checks must still learn raylane's strategies on a later import.
import raylane
import raylane_echo
from raylane import RaylaneError, get_strategy
from raylane.strategy import RayClusterEnvironment, RayStrategyMixin
from raylane_ddp.strategy import RayDDPStrategy

pl = importlib.import_module(sys.argv[1])

BACKENDS = ("ddp", "sharded", "echo")
OTHER = {"pytorch_lightning": "lightning.pytorch", "lightning.pytorch": "pytorch_lightning"}[sys.argv[1]]


def accepted_by_the_trainer(backend: str) -> bool:
    strategy = get_strategy(backend, workers=2)  # which Lightning: the one imported
    trainer = pl.Trainer(strategy=strategy, logger=False, enable_progress_bar=False)
    copy = pickle.loads(pickle.dumps(strategy))  # as the workers receive it: the same class, found by name
    accepted = trainer.strategy is strategy and isinstance(strategy, pl.strategies.Strategy)
    return accepted and type(copy) is type(strategy)


def error_of(call: Any) -> str:
    try:
        call()
    except RaylaneError as err:
        return f"{type(err).__name__}: {err}"
    return ""


def old_style_backend() -> dict[str, str]:
    """A backend of raylane 0.1: a hook without `lightning`, a class listing pytorch_lightning's DDPStrategy."""
    from pytorch_lightning.strategies import DDPStrategy

    class OldStyle(RayStrategyMixin, DDPStrategy):
        backend_name = "echo"

        def __init__(self, workers: int = 2, **options: object) -> None:
            self.init_ray_options({"workers": workers, **options})
            super().__init__(cluster_environment=RayClusterEnvironment())

    @raylane.hookimpl
    def raylane_strategy_class() -> type:
        return OldStyle

    raylane_echo.raylane_strategy_class = raylane_strategy_class
    return {
        "pytorch_lightning": type(get_strategy("echo", workers=2, lightning="pytorch_lightning")).__name__,
        "lightning.pytorch": error_of(lambda: get_strategy("echo", workers=2, lightning="lightning.pytorch")),
    }


def main() -> None:
    report: dict[str, Any] = {"accepted": {backend: accepted_by_the_trainer(backend) for backend in BACKENDS}}
    registered = pl.Trainer(strategy="ray_ddp", logger=False, enable_progress_bar=False).strategy
    report["registry_string"] = [type(registered).__qualname__, registered.launch_options.workers]
    report["class_path_is_a_strategy"] = issubclass(RayDDPStrategy, pl.strategies.Strategy)  # what LightningCLI checks
    importlib.import_module(OTHER)
    report["both_imported"] = error_of(lambda: get_strategy("ddp", workers=2))
    report["explicit"] = type(get_strategy("ddp", workers=2, lightning=sys.argv[1])).__qualname__
    report["not_a_namespace"] = error_of(lambda: get_strategy("ddp", workers=2, lightning="lightning.tensorflow"))
    report["old_style"] = old_style_backend()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
