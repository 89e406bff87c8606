"""What travels to the workers: an unpicklable part is named by its attribute path; global torch state round-trips."""

from __future__ import annotations

import pickle
import random
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from raylane.payload import GlobalTorchState, find_unpicklable


class WithLock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.lock = threading.Lock()


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 2)
        self.sub = WithLock()
        self.lr = 0.1


LOCK_TYPE = f"{type(threading.Lock()).__module__}.{type(threading.Lock()).__qualname__}"


def test_the_innermost_unpicklable_attribute_of_a_model_is_named() -> None:
    assert find_unpicklable(Model(), "model") == f"model.sub.lock ({LOCK_TYPE})"


def test_unpicklable_items_inside_containers_are_named_by_key_and_index() -> None:
    arguments = ((), {"loaders": [torch.zeros(1), threading.Lock()]})

    assert find_unpicklable(arguments, "args") == f"args[1]['loaders'][1] ({LOCK_TYPE})"


@pytest.mark.parametrize(
    "obj",
    [nn.Linear(3, 1), {"weights": torch.ones(2), "steps": [1, 2, 3]}, lambda x: x + 1, WithLock().linear],
    ids=["module", "dict of tensors", "lambda", "submodule"],
)
def test_anything_picklable_gives_none(obj: object) -> None:
    assert find_unpicklable(obj, "model") is None


@pytest.fixture
def restore_global_state() -> Iterator[None]:
    state = GlobalTorchState.capture()
    yield
    state.restore()


def draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


@pytest.mark.usefixtures("restore_global_state")
def test_restoring_the_captured_state_replays_the_same_random_draws() -> None:
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    # It travels to the workers pickled.
    state = pickle.loads(pickle.dumps(GlobalTorchState.capture()))
    after_capture = draws()
    draws()  # move every generator on

    state.restore()

    assert draws() == after_capture


@pytest.mark.usefixtures("restore_global_state")
def test_restoring_brings_back_the_determinism_flags() -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    state = GlobalTorchState.capture()
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = False

    state.restore()

    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.benchmark
