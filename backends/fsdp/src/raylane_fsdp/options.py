"""The ``fsdp`` backend's own options: what each means, and their validation on the driver, before any actor starts.

Everything here is plain data (class names, dtype names, numbers), so a validated :class:`FSDPConfig` pickles to the
workers cheaply; the torch objects it describes (mesh, mixed-precision and offload policies) are built there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from raylane.errors import ConfigurationError

FSDP_OPTIONS: Mapping[str, str] = {
    "tensor_parallel": "tensor-parallel degree (default 1); must divide workers. The LightningModule's configure_model "
    "applies tensor parallelism on self.device_mesh['tensor_parallel']",
    "data_parallel": "data-parallel (sharding) degree; default workers // tensor_parallel, the only value allowed",
    "hybrid_shard": "shard inside a node, replicate across nodes: True (shard group = one node's workers) or the "
    "shard-group size; default False (shard across every data-parallel worker)",
    "mixed_precision": "FSDP mixed precision: 'bf16' or 'fp16' (parameters in that dtype, gradients reduced in "
    "float32), a dict of param_dtype / reduce_dtype / output_dtype, a torch MixedPrecisionPolicy, or None (float32)",
    "activation_checkpointing": "module classes (or class names) whose forward is recomputed in the backward pass",
    "cpu_offload": "keep sharded parameters, gradients and optimizer state in CPU memory (True/False, GPU workers)",
    "wrap_modules": "module classes (or class names) that each become their own FSDP unit; every name must occur "
    "in the model",
    "min_wrap_params": f"without wrap_modules: a submodule becomes an FSDP unit when it holds at least this many "
    f"parameters not already in a unit (default {1_000_000:_})",
    "state_dict_type": "checkpoints: 'sharded' (default; a torch distributed-checkpoint directory every rank writes "
    "its shard to) or 'full' (one consolidated file, written by rank 0)",
    "reshard_after_forward": "free each unit's gathered parameters after its forward (default True; False keeps them "
    "until the backward pass: faster, more memory)",
    "process_group_backend": "'nccl' or 'gloo'; default nccl on GPUs, gloo on CPUs (gloo lets workers share a GPU)",
}

STATE_DICT_TYPES = ("sharded", "full")
PROCESS_GROUP_BACKENDS = ("nccl", "gloo")
DEFAULT_MIN_WRAP_PARAMS = 1_000_000
# Dtype names a user may give (mixed_precision={"param_dtype": "bfloat16"}) -> torch's name. Plain strings, so that
# listing the backend's options imports no torch.
DTYPES: Mapping[str, str] = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
}
PRECISION_FIELDS = ("param_dtype", "reduce_dtype", "output_dtype")


@dataclass(frozen=True)
class FSDPConfig:
    """The validated options, as the workers apply them."""

    workers: int
    tensor_parallel: int = 1
    hybrid_shard: bool | int = False
    mixed_precision: Mapping[str, str] | None = None  # PRECISION_FIELDS -> dtype name
    mixed_precision_policy: Any = None  # a MixedPrecisionPolicy the user built, passed through as is
    activation_checkpointing: tuple[str, ...] = ()
    cpu_offload: bool = False
    wrap_modules: tuple[str, ...] = ()
    min_wrap_params: int = DEFAULT_MIN_WRAP_PARAMS
    state_dict_type: str = "sharded"
    reshard_after_forward: bool = True
    process_group_backend: str | None = None

    @property
    def data_parallel(self) -> int:
        return self.workers // self.tensor_parallel

    def shard_group_size(self, local_world_size: int) -> int:
        """How many data-parallel ranks share one copy of the sharded state (all of them without hybrid sharding)."""
        if self.hybrid_shard is False:
            return self.data_parallel
        if self.hybrid_shard is True:
            return max(1, local_world_size // self.tensor_parallel)
        return int(self.hybrid_shard)


def parse_options(options: Mapping[str, Any], workers: int, use_gpu: bool) -> FSDPConfig:
    """Check every option and how they combine; raise :class:`ConfigurationError` saying what to change."""
    tensor_parallel = _positive_int(options, "tensor_parallel", 1)
    if workers % tensor_parallel:
        raise ConfigurationError(
            f"tensor_parallel={tensor_parallel} does not divide workers={workers}: every tensor-parallel group needs "
            f"{tensor_parallel} workers. Use a divisor of {workers} "
            f"({', '.join(str(d) for d in range(1, workers + 1) if workers % d == 0)}) or change workers."
        )
    data_parallel = _positive_int(options, "data_parallel", workers // tensor_parallel)
    if data_parallel * tensor_parallel != workers:
        raise ConfigurationError(
            f"data_parallel={data_parallel} x tensor_parallel={tensor_parallel} must equal workers={workers}; "
            f"leave data_parallel out (it is workers // tensor_parallel = {workers // tensor_parallel})."
        )
    hybrid_shard = options.get("hybrid_shard", False)
    if not isinstance(hybrid_shard, bool):
        _positive_int(options, "hybrid_shard", 1)
        if data_parallel % hybrid_shard:
            raise ConfigurationError(
                f"hybrid_shard={hybrid_shard} (the shard-group size) must divide the data-parallel degree "
                f"{data_parallel} (workers // tensor_parallel), so that every replica holds whole shard groups."
            )
    policy, precision = _mixed_precision(options.get("mixed_precision"))
    cpu_offload = options.get("cpu_offload", False)
    if not isinstance(cpu_offload, bool):
        raise ConfigurationError(f"cpu_offload must be True or False, got {cpu_offload!r}.")
    min_wrap_params = options.get("min_wrap_params", DEFAULT_MIN_WRAP_PARAMS)
    if isinstance(min_wrap_params, bool) or not isinstance(min_wrap_params, int) or min_wrap_params < 1:
        raise ConfigurationError(f"min_wrap_params must be a positive whole number, got {min_wrap_params!r}.")
    state_dict_type = options.get("state_dict_type", "sharded")
    if state_dict_type not in STATE_DICT_TYPES:
        raise ConfigurationError(
            f"state_dict_type={state_dict_type!r}; use 'sharded' (a distributed-checkpoint directory, the default) "
            "or 'full' (one consolidated file)."
        )
    reshard_after_forward = options.get("reshard_after_forward", True)
    if not isinstance(reshard_after_forward, bool):
        raise ConfigurationError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}.")
    return FSDPConfig(
        workers=workers,
        tensor_parallel=tensor_parallel,
        hybrid_shard=hybrid_shard,
        mixed_precision=precision,
        mixed_precision_policy=policy,
        activation_checkpointing=module_names(options.get("activation_checkpointing"), "activation_checkpointing"),
        cpu_offload=cpu_offload,
        wrap_modules=module_names(options.get("wrap_modules"), "wrap_modules"),
        min_wrap_params=min_wrap_params,
        state_dict_type=state_dict_type,
        reshard_after_forward=reshard_after_forward,
        process_group_backend=process_group_backend(options.get("process_group_backend"), use_gpu),
    )


def process_group_backend(requested: str | None, uses_gpu: bool) -> str:
    """The torch.distributed backend: what the user asked for, else nccl on GPUs and gloo on CPUs."""
    if requested is None:
        return "nccl" if uses_gpu else "gloo"
    if requested not in PROCESS_GROUP_BACKENDS:
        raise ConfigurationError(
            f"process_group_backend={requested!r}; use one of {', '.join(PROCESS_GROUP_BACKENDS)}."
        )
    if requested == "nccl" and not uses_gpu:
        raise ConfigurationError("process_group_backend='nccl' needs GPUs; pass use_gpu=True or use 'gloo'.")
    return requested


def module_names(value: Any, option: str) -> tuple[str, ...]:
    """Class names from a class, a name, or an iterable of them (classes count by ``__name__``)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, type)) else value
    if not isinstance(items, Iterable):
        raise ConfigurationError(f"{option} takes module classes or class names, got {value!r}.")
    names = []
    for item in items:
        if isinstance(item, type) and _is_module_class(item):
            names.append(item.__name__)
        elif isinstance(item, str) and item.isidentifier():
            names.append(item)
        else:
            raise ConfigurationError(
                f"{option}: {item!r} is neither a torch.nn.Module subclass nor a class name; pass classes such as "
                "nn.TransformerEncoderLayer or names such as 'TransformerEncoderLayer'."
            )
    return tuple(dict.fromkeys(names))


def _is_module_class(item: type) -> bool:
    from torch import nn

    return issubclass(item, nn.Module)


def _positive_int(options: Mapping[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive whole number, got {value!r}.")
    return value


def _mixed_precision(value: Any) -> tuple[Any, dict[str, str] | None]:
    """(a user's own MixedPrecisionPolicy, or None; dtype names by field, or None for float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if value is None:
        return None, None
    if isinstance(value, MixedPrecisionPolicy):
        return value, None
    if isinstance(value, str):
        if value not in ("bf16", "fp16"):
            raise ConfigurationError(
                f"mixed_precision={value!r}; use 'bf16', 'fp16', a dict of {', '.join(PRECISION_FIELDS)}, "
                "a torch.distributed.fsdp.MixedPrecisionPolicy, or None."
            )
        return None, {"param_dtype": _dtype_name(value, "mixed_precision"), "reduce_dtype": "float32"}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(PRECISION_FIELDS))
        if unknown:
            raise ConfigurationError(
                f"mixed_precision: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(PRECISION_FIELDS)}."
            )
        return None, {name: _dtype_name(dtype, f"mixed_precision[{name!r}]") for name, dtype in value.items()}
    raise ConfigurationError(
        f"mixed_precision={value!r}; use 'bf16', 'fp16', a dict of {', '.join(PRECISION_FIELDS)}, "
        "a torch.distributed.fsdp.MixedPrecisionPolicy, or None."
    )


def _dtype_name(value: Any, where: str) -> str:
    import torch

    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ConfigurationError(f"{where}={value!r}; use torch.bfloat16, torch.float16 or torch.float32 (or their names).")
