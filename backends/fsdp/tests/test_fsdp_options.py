"""The fsdp backend's options: bad input fails before any actor starts, and what the options do to a model.

Most checks here need no workers: option validation, which submodules become FSDP units, and activation
checkpointing. One fit shows the options that change how a model is sharded (named units, hybrid sharding on one
node, bf16 mixed precision) still train on CPU workers, and one shows a configure_model error names the culprit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from raylane import ConfigurationError, WorkerError, get_strategy
from raylane.testing import (
    ClassifierModel,
    ReferenceSampler,
    assert_released,
    ensure_local_ray,
    make_dataset,
    make_loader,
)
from raylane_fsdp.options import DEFAULT_MIN_WRAP_PARAMS, parse_options
from raylane_fsdp.sharding import checkpoint_activations, shard_units

QUIET: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(inputs)))


class BlockClassifier(ClassifierModel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer = nn.Sequential(Block(8), Block(8), nn.Linear(8, 3))


class LateLayers(ClassifierModel):
    """Builds its layers in configure_model: what exists there is known only on the workers."""

    def configure_model(self) -> None:
        self.extra = nn.Linear(3, 3)


# -- bad input fails in get_strategy, before anything touches Ray ----------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 4, "tensor_parallel": 3}, r"tensor_parallel=3 does not divide workers=4.*\(1, 2, 4\)"),
        ({"workers": 4, "tensor_parallel": 0}, "tensor_parallel must be a positive whole number"),
        ({"workers": 4, "tensor_parallel": 2, "data_parallel": 4}, r"data_parallel=4 x tensor_parallel=2"),
        ({"workers": 4, "hybrid_shard": 3}, "hybrid_shard=3 .* must divide the data-parallel degree 4"),
        ({"mixed_precision": "int8"}, "mixed_precision='int8'; use 'bf16', 'fp16'"),
        ({"mixed_precision": {"param_dtype": torch.int8}}, r"mixed_precision\['param_dtype'\]=torch.int8"),
        ({"mixed_precision": {"weights": "bf16"}}, "unknown field.* weights; the fields are param_dtype"),
        ({"wrap_modules": [nn.Linear, 3]}, "3 is neither a torch.nn.Module subclass nor a class name"),
        ({"activation_checkpointing": "not a name"}, "'not a name' is neither"),
        ({"min_wrap_params": 0}, "min_wrap_params must be a positive whole number"),
        ({"state_dict_type": "local"}, "state_dict_type='local'; use 'sharded'"),
        ({"cpu_offload": "yes"}, "cpu_offload must be True or False"),
        ({"process_group_backend": "nccl"}, "'nccl' needs GPUs"),
        ({"process_group_backend": "mpi"}, "use one of nccl, gloo"),
    ],
)
def test_invalid_options_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        get_strategy("fsdp", **{"workers": 2, **options})


def test_cpu_offload_on_cpu_workers_warns_that_it_changes_nothing() -> None:
    with pytest.warns(UserWarning, match="cpu_offload=True on CPU workers changes nothing"):
        get_strategy("fsdp", workers=2, cpu_offload=True)


def test_options_as_the_workers_receive_them() -> None:
    config = parse_options(
        {"tensor_parallel": 2, "mixed_precision": "bf16", "wrap_modules": [Block, "Linear", Block]}, 8, False
    )
    assert (config.data_parallel, config.tensor_parallel) == (4, 2)
    assert config.mixed_precision == {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    assert config.wrap_modules == ("Block", "Linear")
    assert (config.state_dict_type, config.min_wrap_params, config.process_group_backend) == (
        "sharded",
        DEFAULT_MIN_WRAP_PARAMS,
        "gloo",
    )
    # One node of 8 workers: hybrid sharding's shard group is the node's data-parallel ranks, replicated once.
    assert parse_options({"hybrid_shard": True}, 8, False).shard_group_size(local_world_size=8) == 8
    assert parse_options({"hybrid_shard": True}, 8, False).shard_group_size(local_world_size=4) == 4
    assert parse_options({"hybrid_shard": 2}, 8, False).shard_group_size(local_world_size=8) == 2
    dtypes = parse_options({"mixed_precision": {"param_dtype": torch.float16, "output_dtype": "fp32"}}, 2, False)
    assert dtypes.mixed_precision == {"param_dtype": "float16", "output_dtype": "float32"}


# -- named modules the model lacks fail at fit, before any actor starts ---------------------------------------------


@pytest.mark.parametrize("option", ["wrap_modules", "activation_checkpointing"])
def test_a_class_the_model_lacks_fails_on_the_driver(option: str, tmp_path: Path) -> None:
    ensure_local_ray()
    trainer = pl.Trainer(strategy=get_strategy("fsdp", workers=2, **{option: "TransformerBlock"}), **QUIET)
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=f"{option} names TransformerBlock, .* classes are: ClassifierModel"):
        trainer.fit(ClassifierModel(), make_loader(8))
    assert time.monotonic() - started < 10, "rejected before any worker started"
    assert_released()


def test_a_class_configure_model_lacks_fails_on_the_workers_naming_it(tmp_path: Path) -> None:
    ensure_local_ray()
    trainer = pl.Trainer(strategy=get_strategy("fsdp", workers=2, wrap_modules="Conv2d"), **QUIET)
    with pytest.raises(WorkerError, match=r"wrap_modules names Conv2d, which the model \(LateLayers\) does not"):
        trainer.fit(LateLayers(), make_loader(8))
    assert_released()


# -- which submodules become units; activation checkpointing -------------------------------------------------------


def test_units_by_parameter_count_are_chosen_bottom_up_without_double_wrapping() -> None:
    model = BlockClassifier()  # each Block: two Linear(8, 8) of 72 parameters; the head: Linear(8, 3) of 27
    config = parse_options({"min_wrap_params": 72}, 2, False)
    units = shard_units(model, config)
    linears = [model.layer[0].inner, model.layer[0].outer, model.layer[1].inner, model.layer[1].outer]
    assert units == linears, "every Linear(8, 8) is a unit; their Blocks hold nothing left; the head stays in the root"
    units = shard_units(model, parse_options({"min_wrap_params": 100}, 2, False))
    assert units == [model.layer[0], model.layer[1]], "a Block's two Linears together reach 100"
    assert shard_units(model, parse_options({}, 2, False)) == [], "small models: the root is the only unit"


def test_under_manual_optimization_every_module_holding_parameters_is_in_a_unit_inner_first() -> None:
    # training_step calls layers directly and runs its own backward: no parameter may stay with the root unit, whose
    # gathering only the root's forward would trigger. Units chosen by size stay as they are.
    model = BlockClassifier()
    units = shard_units(model, parse_options({"min_wrap_params": 100}, 2, False), manual_optimization=True)
    assert units == [model.layer[2], model.layer[1], model.layer[0]], "the two Blocks and the head the root held"
    units = shard_units(model, parse_options({}, 2, False), manual_optimization=True)
    assert units == [m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)]


def test_units_by_class_name_take_every_module_of_the_class_inner_first() -> None:
    model = BlockClassifier()
    units = shard_units(model, parse_options({"wrap_modules": [Block, "Linear"]}, 2, False))
    expected = [m for m in model.modules() if isinstance(m, (Block, nn.Linear))]
    assert len(units) == len(expected) == 7 and {id(m) for m in units} == {id(m) for m in expected}
    assert all(units.index(block.inner) < units.index(block) for block in (model.layer[0], model.layer[1]))


def test_activation_checkpointing_recomputes_the_forward_and_keeps_gradients_and_names() -> None:
    calls = []

    class Counted(nn.Linear):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return torch.tanh(super().forward(inputs))

    torch.manual_seed(0)
    plain, checkpointed = nn.Sequential(Counted(4, 4), nn.Linear(4, 1)), nn.Sequential(Counted(4, 4), nn.Linear(4, 1))
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_activations(checkpointed, ["Counted"])
    inputs = torch.randn(5, 4)
    plain(inputs).sum().backward()
    calls.clear()
    checkpointed(inputs).sum().backward()
    assert len(calls) == 2, "the forward ran again in the backward pass"
    assert [name for name, _ in checkpointed.named_parameters()] == [name for name, _ in plain.named_parameters()]
    for mine, theirs in zip(checkpointed.parameters(), plain.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)


# -- the sharding options train on CPU workers ----------------------------------------------------------------------


def test_named_units_hybrid_sharding_and_bf16_train_close_to_one_process(tmp_path: Path) -> None:
    ensure_local_ray()
    torch.manual_seed(2)
    model, reference = BlockClassifier(), BlockClassifier()
    reference.load_state_dict(model.state_dict())
    strategy = get_strategy(
        "fsdp", workers=2, wrap_modules=[Block], hybrid_shard=True, mixed_precision="bf16", idle_timeout=0
    )
    trainer = pl.Trainer(strategy=strategy, max_epochs=2, default_root_dir=str(tmp_path), **QUIET)
    data = DataLoader(make_dataset(samples=64), batch_size=8)
    trainer.fit(model, data, DataLoader(make_dataset(samples=16, seed=1), batch_size=8))
    pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, enable_checkpointing=False, **QUIET).fit(
        reference, DataLoader(make_dataset(samples=64), batch_size=16, sampler=ReferenceSampler(64))
    )
    differences = [float((model.state_dict()[k] - value).abs().max()) for k, value in reference.state_dict().items()]
    assert max(differences) > 1e-4, "bf16 compute differs from float32 by more than summation order would"
    for name, value in reference.state_dict().items():
        assert model.state_dict()[name].dtype == torch.float32, "the sharded parameters stay float32"
        torch.testing.assert_close(model.state_dict()[name], value, atol=2e-2, rtol=0)
    assert Path(trainer.checkpoint_callback.best_model_path).is_dir()


# -- Tuner.lr_find ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_a_learning_rate_search_is_refused_before_any_worker_starts(state_dict_type: str, tmp_path: Path) -> None:
    # The search restores its checkpoint with Lightning's ModelParallelStrategy, which fails on the workers with
    # either kind of checkpoint (KeyError, IndexError) once the search has changed the optimizer.
    from pytorch_lightning.tuner import Tuner

    ensure_local_ray()
    strategy = get_strategy("fsdp", workers=2, idle_timeout=0, state_dict_type=state_dict_type)
    trainer = pl.Trainer(strategy=strategy, max_epochs=1, default_root_dir=str(tmp_path), **QUIET)
    with pytest.raises(ConfigurationError, match=r"cannot search on the fsdp backend: .* Search with the ddp backend"):
        Tuner(trainer).lr_find(ClassifierModel(), make_loader(4, samples=256), num_training=10)
    assert_released()
