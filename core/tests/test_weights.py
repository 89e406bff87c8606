"""Trained weights survive the trip from rank 0 to the driver exactly, whatever their dtype, shape or layout."""

from __future__ import annotations

import pickle

import pytest
import torch

from raylane.weights import TensorBytes, pack_state_dict, unpack_state_dict

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0, 3), (5,), (3, 4, 2)], ids=str)
def test_every_dtype_and_shape_comes_back_equal(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = (torch.rand(shape) * 100).to(dtype)
    packed = pack_state_dict({"weight": tensor})
    assert isinstance(packed["weight"], TensorBytes)  # travels as a numpy buffer, not a pickled tensor
    back = unpack_state_dict(pickle.loads(pickle.dumps(packed)))["weight"]
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


@pytest.mark.timeout(30)
def test_views_parameters_and_other_values_load_into_a_module() -> None:
    source = torch.nn.Linear(4, 3)
    state = {**source.state_dict(), "weight": source.weight.detach().t().contiguous().t()}  # a non-contiguous view
    state["step"] = 7  # not a tensor: passes as is
    back = unpack_state_dict(pickle.loads(pickle.dumps(pack_state_dict(state))))
    assert back["step"] == 7
    target = torch.nn.Linear(4, 3)
    target.load_state_dict({k: v for k, v in back.items() if k != "step"})
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


@pytest.mark.timeout(30)
def test_sparse_tensors_pass_unchanged() -> None:
    sparse = torch.eye(3).to_sparse()
    assert pack_state_dict({"s": sparse})["s"] is sparse
