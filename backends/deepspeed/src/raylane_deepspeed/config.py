"""The backend's options and the DeepSpeed config they make, checked on the driver before any actor starts.

Two ways to configure ZeRO, which combine: this backend's options (``stage=3, offload_optimizer=True``), and a
DeepSpeed config (a dict, or the path of a JSON file) passed through as DeepSpeed documents it. An option fills in what
the config leaves out; an option that contradicts a value the config sets is an error naming both, so nothing is
silently ignored. Nothing here imports DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raylane import ConfigurationError

STAGES = (1, 2, 3)
OFFLOAD_DEVICES = ("cpu", "nvme")

BACKEND_OPTIONS: Mapping[str, str] = {
    "stage": "ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters); default 2",
    "offload_optimizer": "keep optimizer state, and run the optimizer step, in CPU memory (or NVMe); any stage",
    "offload_parameters": "keep parameters in CPU memory (or NVMe) between uses; stage 3 only",
    "offload_optimizer_device": "'cpu' (default) or 'nvme' for offload_optimizer",
    "offload_params_device": "'cpu' (default) or 'nvme' for offload_parameters",
    "nvme_path": "directory on each node's NVMe drive for 'nvme' offload",
    "pin_memory": "page-locked CPU buffers for offload (faster GPU transfers, more host memory)",
    "config": "a DeepSpeed config dict or the path of a JSON file, passed through; options fill in what it leaves out",
    "allgather_bucket_size": "ZeRO: elements all-gathered at a time (memory against speed)",
    "reduce_bucket_size": "ZeRO: elements reduced at a time (memory against speed)",
    "overlap_comm": "ZeRO: overlap gradient reduction with the backward pass",
    "contiguous_gradients": "ZeRO: copy gradients into one contiguous buffer as they are produced",
    "sub_group_size": "ZeRO-3: parameters per optimizer-step tile (for offloaded trillion-parameter models)",
    "partition_activations": "activation checkpointing: partition checkpointed activations across workers",
    "cpu_checkpointing": "activation checkpointing: keep partitioned activations in CPU memory",
    "contiguous_memory_optimization": "activation checkpointing: copy checkpoints into one buffer",
    "load_full_weights": "ZeRO-3: resume from a single-file (consolidated) checkpoint instead of a DeepSpeed directory",
    "exclude_frozen_parameters": "leave frozen parameters out of checkpoints",
    "logging_level": "DeepSpeed's logging level (default logging.WARN)",
    "logging_batch_size_per_gpu": "batch size DeepSpeed reports throughput for ('auto': the train loader's)",
    "loss_scale": "fp16: static loss scale; 0 (default) scales dynamically",
    "initial_scale_power": "fp16: the dynamic loss scale starts at 2**initial_scale_power",
    "loss_scale_window": "fp16: steps without overflow before the dynamic scale grows",
    "hysteresis": "fp16: overflows tolerated before the dynamic scale shrinks",
    "min_loss_scale": "fp16: the smallest dynamic loss scale",
}

# Options that are entries of the DeepSpeed config, by their path in it. With a config, each fills in or must agree.
CONFIG_KEYS: Mapping[str, tuple[str, ...]] = {
    "logging_batch_size_per_gpu": ("train_micro_batch_size_per_gpu",),
    "stage": ("zero_optimization", "stage"),
    "allgather_bucket_size": ("zero_optimization", "allgather_bucket_size"),
    "reduce_bucket_size": ("zero_optimization", "reduce_bucket_size"),
    "overlap_comm": ("zero_optimization", "overlap_comm"),
    "contiguous_gradients": ("zero_optimization", "contiguous_gradients"),
    "sub_group_size": ("zero_optimization", "sub_group_size"),
    "partition_activations": ("activation_checkpointing", "partition_activations"),
    "cpu_checkpointing": ("activation_checkpointing", "cpu_checkpointing"),
    "contiguous_memory_optimization": ("activation_checkpointing", "contiguous_memory_optimization"),
}
OFFLOAD_SECTIONS = {"offload_optimizer": "offload_optimizer", "offload_parameters": "offload_param"}
OFFLOAD_DETAILS = ("offload_optimizer_device", "offload_params_device", "nvme_path", "pin_memory")
BOOLEAN_OPTIONS = (
    "offload_optimizer",
    "offload_parameters",
    "pin_memory",
    "overlap_comm",
    "contiguous_gradients",
    "partition_activations",
    "cpu_checkpointing",
    "contiguous_memory_optimization",
    "load_full_weights",
    "exclude_frozen_parameters",
)


def load_config(config: object) -> dict[str, Any] | None:
    """The user's DeepSpeed config as a dict (a copy): from a dict, or read from a JSON file on the driver.

    Reading it here means the workers receive the dict and never need the file.
    """
    if config is None:
        return None
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigurationError(
            f"config must be a DeepSpeed config dict or the path of a JSON file, got {type(config).__name__}."
        )
    path = Path(config).expanduser()
    if not path.is_file():
        raise ConfigurationError(
            f"config={str(config)!r}: no such file (looked in {path.resolve()}). Pass the path of a DeepSpeed JSON "
            "config, or the config itself as a dict."
        )
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigurationError(f"config={str(config)!r} is not a readable JSON file: {err}.") from None
    if not isinstance(loaded, dict):
        raise ConfigurationError(f"config={str(config)!r} holds a JSON {type(loaded).__name__}, not an object.")
    return loaded


def check_options(options: Mapping[str, Any]) -> None:
    """Types and values of the options themselves (the combined config is checked by :func:`check_config`)."""
    stage = options.get("stage")
    if stage is not None and (type(stage) is not int or stage not in STAGES):
        raise ConfigurationError(
            f"stage={stage!r}; use 1 (shard optimizer state), 2 (and gradients) or 3 (and parameters). For no "
            "sharding at all, use the ddp backend."
        )
    for name in BOOLEAN_OPTIONS:
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            raise ConfigurationError(f"{name} must be True or False, got {value!r}.")
    for name in ("offload_optimizer_device", "offload_params_device"):
        device = options.get(name)
        if device is not None and device not in OFFLOAD_DEVICES:
            raise ConfigurationError(f"{name}={device!r}; use one of {', '.join(map(repr, OFFLOAD_DEVICES))}.")
    for name in ("allgather_bucket_size", "reduce_bucket_size", "sub_group_size"):
        size = options.get(name)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigurationError(f"{name} must be a whole number of elements >= 1, got {size!r}.")
    if options.get("offload_optimizer") is False and options.get("offload_optimizer_device") is not None:
        raise ConfigurationError("offload_optimizer_device is given but offload_optimizer=False; drop one of them.")
    if options.get("offload_parameters") is False and options.get("offload_params_device") is not None:
        raise ConfigurationError("offload_params_device is given but offload_parameters=False; drop one of them.")


def merge_into_config(config: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with what the options add; an option that contradicts a value ``config`` sets is an error."""
    merged = copy.deepcopy(config)
    for name, path in CONFIG_KEYS.items():
        value = options.get(name)
        if value is None or (name == "logging_batch_size_per_gpu" and value == "auto"):
            continue
        *sections, key = path
        block = merged
        for section in sections:
            block = block.setdefault(section, {})
        if key in block and block[key] != value:
            where = "".join(f"[{part!r}]" for part in path)
            raise ConfigurationError(
                f"{name}={value!r} contradicts config{where}={block[key]!r}; give it once (in the config or as an "
                "option)."
            )
        block[key] = value
    details = [name for name in OFFLOAD_DETAILS if options.get(name) is not None]
    if details:
        raise ConfigurationError(
            f"{', '.join(details)} cannot be combined with config=...: write them into the config's "
            "zero_optimization.offload_optimizer / offload_param sections (device, nvme_path, pin_memory)."
        )
    zero = merged.setdefault("zero_optimization", {})
    for name, section in OFFLOAD_SECTIONS.items():
        wanted = options.get(name)
        if wanted is None:
            continue
        present = _offloads(zero.get(section))
        if section in zero and present != wanted:
            raise ConfigurationError(
                f"{name}={wanted!r} contradicts config['zero_optimization'][{section!r}]={zero[section]!r}; give "
                "it once (in the config or as an option)."
            )
        if wanted and section not in zero:
            zero[section] = {"device": "cpu"}
    return merged


def check_config(config: Mapping[str, Any]) -> None:
    """What DeepSpeed would reject only once the workers started, or accept and quietly ignore."""
    zero = config.get("zero_optimization")
    if zero is None or zero is False:
        return
    if not isinstance(zero, Mapping):
        raise ConfigurationError(f"config['zero_optimization'] must be a dict, got {zero!r}.")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, *STAGES):
        raise ConfigurationError(f"config['zero_optimization']['stage']={stage!r}; DeepSpeed's ZeRO stages are 0-3.")
    if _offloads(zero.get("offload_param")) and stage != 3:
        raise ConfigurationError(
            f"Parameter offload (offload_parameters / offload_param) needs ZeRO stage 3, but the stage is {stage}: "
            "only stage 3 partitions the parameters it would move. Pass stage=3, or offload the optimizer only."
        )
    if _offloads(zero.get("offload_optimizer")) and stage == 0:
        raise ConfigurationError("Optimizer offload needs a ZeRO stage of 1, 2 or 3; the config's stage is 0.")


def zero_stage(config: Mapping[str, Any]) -> int:
    zero = config.get("zero_optimization")
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0


def offloads(config: Mapping[str, Any]) -> list[str]:
    """Which offload sections of the config are on."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, Mapping):
        return []
    return [section for section in OFFLOAD_SECTIONS.values() if _offloads(zero.get(section))]


def _offloads(section: object) -> bool:
    """A DeepSpeed offload section is on unless absent, null, or its device is "none"."""
    if section is None:
        return False
    if isinstance(section, Mapping):
        return section.get("device", "none") not in (None, "none")
    return bool(section)
