"""``RayDeepSpeedStrategy``: Lightning's DeepSpeedStrategy, launched on raylane's Ray workers (either namespace).

Lightning's strategy assumes CUDA devices and starts its own process group; on raylane the launcher assigns each
worker its device and the backend's ``raylane_setup_process_group`` hook brings up the one group DeepSpeed wraps. So
this class (through public Lightning hooks) skips the CUDA-only check on CPU workers, leaves the process group alone,
and gathers ZeRO-3's partitioned parameters into full weights for the driver. The engine saves and loads a directory of
per-rank files through local paths: checkpoint URLs pass through node-local staging (:mod:`raylane.staged_checkpoints`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import torch

from raylane import _lightning
from raylane.errors import ConfigurationError
from raylane.staged_checkpoints import StagedURLCheckpoints
from raylane.strategy import DRIVER_CHECKPOINT_WARNING, RayClusterEnvironment, RayStrategyMixin
from raylane_deepspeed.config import (
    check_config,
    check_options,
    load_config,
    merge_into_config,
    offloads,
    zero_stage,
)
from raylane_deepspeed.install import require_deepspeed
from raylane_deepspeed.partitions import copy_into_partitions, load_for_evaluation

DEFAULT_STAGE = 2
# Lightning keyword arguments that are not part of the DeepSpeed config, passed through as given.
LIGHTNING_ONLY = (
    "load_full_weights",
    "exclude_frozen_parameters",
    "logging_level",
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "min_loss_scale",
)


class _LoadsZeRO3CheckpointsForEvaluation:
    """Between the URL staging and Lightning's DeepSpeedStrategy: ``validate``/``test``/``predict`` given a ZeRO-3
    checkpoint directory load it themselves, which DeepSpeed's engine cannot (:mod:`raylane_deepspeed.partitions`)."""

    zero_stage: int
    load_full_weights: bool
    lightning_module: Any
    is_global_zero: bool
    broadcast: Any

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        evaluating = self.lightning_module.trainer.state.fn != _lightning.FITTING
        if evaluating and self.zero_stage == 3 and not self.load_full_weights and Path(checkpoint_path).is_dir():
            return load_for_evaluation(self.lightning_module, checkpoint_path, self.is_global_zero, self.broadcast)
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc,no-any-return]


class RayDeepSpeedStrategy(
    StagedURLCheckpoints, _LoadsZeRO3CheckpointsForEvaluation, RayStrategyMixin, lightning_base="DeepSpeedStrategy"
):
    """DeepSpeed ZeRO (stage 1, 2 or 3, optional offload) across ``workers`` Ray actors.

    Build it with ``get_strategy("deepspeed", workers=N, stage=3, ...)``; the options are in
    :data:`raylane_deepspeed.config.BACKEND_OPTIONS`.
    """

    backend_name: ClassVar[str] = "deepspeed"
    strategy_name = "ray_deepspeed"
    learning_rate_search_refusal: ClassVar[str | None] = (
        "the search schedules the learning rate with a torch scheduler, which refuses DeepSpeed's optimizer "
        "('DeepSpeedZeroOptimizer is not an Optimizer'; Lightning's DeepSpeedStrategy fails the same way, inside "
        "every worker)."
    )

    def __init__(self, workers: int = 2, **options: Any) -> None:
        ds_options = self.init_ray_options({"workers": workers, **options})
        check_options(ds_options)
        if self.launch_options.use_gpu and self.launch_options.gpus < 1:
            raise ConfigurationError(
                f"gpus_per_worker={self.launch_options.gpus:g} puts several workers on one GPU, and DeepSpeed's NCCL "
                "group refuses two ranks on one device. Give each worker whole GPUs (gpus_per_worker >= 1)."
            )
        require_deepspeed()
        config = load_config(ds_options.pop("config", None))
        lightning_kwargs = {name: ds_options[name] for name in LIGHTNING_ONLY if name in ds_options}
        if config is None:
            # Lightning builds the config from its own keyword arguments (ours are a subset, under its names).
            zero_kwargs = {name: value for name, value in ds_options.items() if name not in LIGHTNING_ONLY}
            zero_kwargs.setdefault("stage", DEFAULT_STAGE)
            super().__init__(
                cluster_environment=RayClusterEnvironment(),
                timeout=timedelta(seconds=self.launch_options.collective_timeout),
                **zero_kwargs,
                **lightning_kwargs,
            )
        else:
            _reject_accumulation_in_config(config)
            merged = merge_into_config(config, ds_options)
            merged.setdefault("zero_allow_untested_optimizer", True)  # as Lightning's own default config has it
            super().__init__(
                cluster_environment=RayClusterEnvironment(),
                timeout=timedelta(seconds=self.launch_options.collective_timeout),
                config=merged,
                **lightning_kwargs,
            )
        assert isinstance(self.config, dict)
        check_config(self.config)
        if not self.launch_options.use_gpu and offloads(self.config):
            _allow_torch_optimizers_with_offload(self.config)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the final DeepSpeed config (0 when it turns ZeRO off)."""
        assert isinstance(self.config, dict)
        return zero_stage(self.config)

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        # Lightning hands DeepSpeed ``root_device.index`` as its device rank and DeepSpeed compares that with 0, which
        # fails for a plain "cpu" (index None). DeepSpeed's CPU accelerator ignores the index; CPU tensors ignore it.
        return torch.device("cpu", 0) if device.type == "cpu" else device

    @property
    def handles_gradient_accumulation(self) -> bool:
        """False: Lightning's loop decides which batches end in an optimizer step, as in one process (every
        ``accumulate_grad_batches`` batches and the epoch's last), and :meth:`backward` tells the engine. Left to
        DeepSpeed, its own batch counter runs on across epochs: with an epoch whose batch count N does not divide, it
        stepped on other batches than one process, and other than the steps Lightning counted."""
        return False

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        # Lightning wraps the backward of a batch that accumulates in the engine's no_sync(), which ZeRO stages 2 and 3
        # refuse (they reduce gradient partitions on every backward). The boundary backward() sets already keeps
        # stages 0 and 1 from reducing before the step.
        yield

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        trainer = self.lightning_module.trainer
        if trainer.training:
            self.deepspeed_engine.set_gradient_accumulation_boundary(_lightning.steps_after_this_batch(trainer))
        # Lightning's loop has already divided the loss by accumulate_grad_batches; the engine's backward would divide
        # it again by its gradient_accumulation_steps (the same number, set from the Trainer), and accumulated
        # gradients came out N times too small: SGD took steps 1/N the size one process takes. Divide once.
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_environment()
            return
        # Lightning's DeepSpeedStrategy accepts CUDA devices only; DeepSpeed's CPU accelerator runs ZeRO over gloo.
        assert self.accelerator is not None
        self.accelerator.setup_device(self.root_device)
        self._check_cpu_supports_fp16()
        self.setup_distributed()

    def _check_cpu_supports_fp16(self) -> None:
        # DeepSpeed's engine checks this too, but its "Type fp16 is not supported on your device." says neither why
        # nor what to train with instead. Checked on the worker: whether a CPU has fp16 kernels is the worker's matter.
        from deepspeed.accelerator import get_accelerator

        precision = self.precision_plugin.precision
        assert isinstance(self.config, dict)
        asks_fp16 = precision in ("16-mixed", "16-true") or self.config.get("fp16", {}).get("enabled") is True
        if asks_fp16 and not get_accelerator().is_fp16_supported():
            raise ConfigurationError(
                f"precision={precision!r} asks DeepSpeed for fp16, which its CPU accelerator cannot train with on this "
                "worker's CPU (oneDNN has no fp16 kernels for it). Use Trainer(precision='bf16-mixed') (DeepSpeed "
                "keeps fp32 master weights in the optimizer) or '32-true', or train on GPU workers (use_gpu=True)."
            )

    def setup_distributed(self) -> None:
        # The backend's raylane_setup_process_group hook already joined the run's group and handed it to DeepSpeed;
        # Lightning's version would check device indices against local ranks, which raylane's placement decides.
        assert self.lightning is not None
        self.set_world_ranks()
        _reset_seed(self.lightning)

    def check_before_launch(self, trainer: Any) -> None:
        if trainer.gradient_clip_algorithm == "value":
            raise ConfigurationError(
                "DeepSpeed clips gradients by norm only; use Trainer(gradient_clip_algorithm='norm') (Lightning's "
                "DeepSpeedStrategy would fail the same way, inside every worker)."
            )
        assert self.lightning is not None
        scheduler = self.lightning.callbacks.GradientAccumulationScheduler
        if trainer.state.fn == _lightning.FITTING and any(isinstance(c, scheduler) for c in trainer.callbacks):
            raise ConfigurationError(
                "DeepSpeed takes one accumulate_grad_batches for the whole fit: remove the "
                "GradientAccumulationScheduler callback and pass Trainer(accumulate_grad_batches=N) (Lightning's "
                "DeepSpeedStrategy refuses the callback too, inside every worker)."
            )

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.worker_context is not None:
            super().save_checkpoint(checkpoint, filepath, storage_options)  # a URL goes through staging
            return
        # trainer.save_checkpoint on the driver, after fit: no DeepSpeed engine lives here, so the weights and
        # progress go into one ordinary Lightning checkpoint file (the optimizer state stayed on the workers).
        warnings.warn(DRIVER_CHECKPOINT_WARNING, UserWarning, stacklevel=2)
        self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def state_dict_for_driver(self) -> dict[str, Any]:
        """The full weights on rank 0 (other ranks return an empty dict under ZeRO-3).

        ZeRO-3 leaves each rank only its partition of every parameter, so the parameters are gathered one module at
        a time: no rank holds more than one module's full parameters beyond its own partition, and only rank 0 keeps
        the copies (in CPU memory). Every rank must call this, as it is a collective.
        """
        assert self.lightning_module is not None
        if self.zero_stage != 3:
            return super().state_dict_for_driver()  # type: ignore[no-any-return]
        return _gathered_state_dict(self.lightning_module, keep=self.global_rank == 0)

    def load_weights_from_driver(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Under ZeRO-3, ``configure_model`` ran inside ``deepspeed.zero.Init``: its parameters are partitioned
        already: they are gathered whole one submodule at a time for the copy, then partitioned again."""
        if self.zero_stage != 3:
            super().load_weights_from_driver(weights)
            return
        copy_into_partitions(self.lightning_module, weights, set(weights))


def _gathered_state_dict(module: torch.nn.Module, keep: bool) -> dict[str, Any]:
    import deepspeed

    full: dict[str, torch.Tensor] = {}
    for prefix, submodule in module.named_modules():
        own = list(submodule.named_parameters(prefix=prefix, recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([parameter for _, parameter in own], modifier_rank=None):
            if keep:
                full.update({name: parameter.detach().cpu().clone() for name, parameter in own})
    if not keep:
        return {}
    # The module's own state_dict names every entry (buffers, extra state) in order; its parameters are partitions.
    return {name: full.get(name, value) for name, value in module.state_dict().items()}


def _reset_seed(lightning: Any) -> None:
    _lightning.fabric(lightning).utilities.seed.reset_seed()


def _reject_accumulation_in_config(config: dict[str, Any]) -> None:
    if "gradient_accumulation_steps" in config:
        raise ConfigurationError(
            "Remove gradient_accumulation_steps from the DeepSpeed config and pass "
            "Trainer(accumulate_grad_batches=...) instead: Lightning sets it from the Trainer and refuses both."
        )


def _allow_torch_optimizers_with_offload(config: dict[str, Any]) -> None:
    """On CPU workers, keep the LightningModule's own optimizer under offload.

    DeepSpeed otherwise insists on its DeepSpeedCPUAdam, a C++ op compiled on first use; on CPU workers the optimizer
    state is in CPU memory either way.
    """
    config.setdefault("zero_force_ds_cpu_optimizer", False)
