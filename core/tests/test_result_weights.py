"""How the driver's LightningModule takes in the weights the workers trained (``raylane.results.load_trained_weights``),
for the models whose weights do not load by a plain copy, and how the weights it has no place for reach the workers'
model at its next entry point (``raylane.worker_only_weights``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raylane import WeightsNotOnDriverWarning, trained_state_dict
from raylane.results import load_trained_weights
from raylane.worker_only_weights import copy_into, kept


class TiedEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.embed.weight


def trained(module: nn.Module) -> dict[str, torch.Tensor]:
    """What comes back from the workers: new tensors, one per name, tied or not."""
    return {name: torch.randn(value.shape) for name, value in module.state_dict().items()}


def test_a_model_built_on_the_meta_device_takes_the_trained_tensors_and_keeps_its_ties() -> None:
    with torch.device("meta"):
        model = TiedEmbeddings()
    weights = trained(model)
    weights["out.weight"] = weights["embed.weight"].clone()
    load_trained_weights(model, weights)
    assert not model.embed.weight.is_meta and torch.equal(model.embed.weight, weights["embed.weight"])
    assert model.out.weight is model.embed.weight, "tied weights stay one parameter"
    assert model.embed.weight.requires_grad


def test_a_model_with_storage_is_copied_into_in_place() -> None:
    model = TiedEmbeddings()
    parameter = model.embed.weight
    weights = trained(model)
    load_trained_weights(model, weights)
    assert model.embed.weight is parameter and torch.equal(parameter, weights["out.weight"])


def test_weights_trained_in_a_wider_dtype_are_taken_as_they_are_and_narrower_ones_copied_in() -> None:
    # Trainer(precision="64-true") trains float64 weights: one process ends with a float64 model, and rounding them
    # into the driver's float32 model would lose what training found. bf16 weights fit in float32 exactly.
    model = TiedEmbeddings()
    wider = {name: value.double() for name, value in trained(model).items()}
    load_trained_weights(model, wider)
    assert model.embed.weight.dtype == torch.float64 and torch.equal(model.embed.weight, wider["embed.weight"])
    assert model.out.weight is model.embed.weight, "tied weights stay one parameter"
    model = TiedEmbeddings()
    parameter = model.embed.weight
    load_trained_weights(model, {name: value.bfloat16() for name, value in trained(model).items()})
    assert model.embed.weight is parameter and parameter.dtype == torch.float32


def test_names_torch_compile_gave_on_the_workers_are_taken_back() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    weights = {f"0._orig_mod.{name}": torch.randn(value.shape) for name, value in model[0].state_dict().items()}
    load_trained_weights(model, weights)
    assert torch.equal(model[0].weight, weights["0._orig_mod.weight"])


def test_trained_tensors_the_model_has_no_place_for_are_named_and_kept_until_the_next_fit() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    weights = {**trained(model), "1.weight": torch.randn(2, 2)}
    with pytest.warns(WeightsNotOnDriverWarning, match=r"1 trained tensors .*\(1\.weight\)"):
        load_trained_weights(model, weights)
    assert torch.equal(trained_state_dict(model)["1.weight"], weights["1.weight"])
    assert torch.equal(trained_state_dict(model)["0.weight"], model[0].weight)
    load_trained_weights(model, trained(model))  # a later fit whose model the driver holds whole
    assert kept(model) == {}, "an earlier fit's weights do not outlive a fit that had none"


def test_kept_weights_go_into_the_layers_the_workers_built_under_their_names() -> None:
    # configure_model on the workers built what the driver lacks, compiled it (names gain "_orig_mod."), and left
    # a layer on the meta device for the strategy to materialise later.
    built = nn.ModuleDict({"head": torch.compile(nn.Linear(2, 2)), "late": nn.Linear(2, 2, device="meta")})
    weights = {"head.weight": torch.randn(2, 2), "late.weight": torch.randn(2, 2), "gone.weight": torch.randn(1)}
    copied = copy_into(built, weights)
    assert copied == ["head.weight"], "the meta layer waits for its memory, a name the model lacks is skipped"
    assert torch.equal(built["head"].weight, weights["head.weight"])
