"""raylane's errors survive the copies and pickles that Ray and Ray Tune make of them."""

from __future__ import annotations

import copy
import pickle

import pytest
from ray import cloudpickle

from raylane import WorkerError
from raylane.errors import worker_error


def test_worker_error_keeps_rank_and_node_through_copy_and_pickle() -> None:
    error = WorkerError("rank 1 died", rank=1, node_ip="10.0.0.2", node_id="abc123")
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error)), cloudpickle.loads(cloudpickle.dumps(error))):
        assert type(clone) is WorkerError
        assert str(clone) == "rank 1 died"
        assert (clone.rank, clone.node_ip, clone.node_id) == (1, "10.0.0.2", "abc123")


class NeedsTwoArguments(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code


class OwnMessage(ValueError):
    def __str__(self) -> str:
        return f"bad value {self.value}"  # type: ignore[attr-defined]  # set by whoever raised it, not by raylane


def _from_worker(raised: BaseException | None) -> WorkerError:
    return worker_error("rank 1 raised: Traceback ...", rank=1, node_ip="10.0.0.2", node_id="abc", raised=raised)


@pytest.mark.parametrize("raised", [ValueError("x"), KeyError("k"), OSError(2, "gone"), OwnMessage("y")])
def test_the_drivers_error_is_also_the_workers_exception_class(raised: Exception) -> None:
    error = _from_worker(raised)
    assert isinstance(error, WorkerError) and isinstance(error, type(raised))
    assert error.worker_exception_class is type(raised)
    assert (error.rank, error.node_ip, error.node_id) == (1, "10.0.0.2", "abc")
    assert str(error) == "rank 1 raised: Traceback ...", "the message stays raylane's, whatever the class prints"
    assert type(_from_worker(raised)) is type(error), "one class per worker exception class"
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error)), cloudpickle.loads(cloudpickle.dumps(error))):
        assert type(clone) is type(error) and str(clone) == str(error) and clone.rank == 1


@pytest.mark.parametrize("raised", [None, NeedsTwoArguments(1, "d"), KeyboardInterrupt(), _from_worker(ValueError())])
def test_a_class_that_cannot_be_combined_gives_a_plain_worker_error(raised: BaseException | None) -> None:
    error = _from_worker(raised)
    assert type(error) is WorkerError and error.worker_exception_class is None
    assert (error.rank, str(error)) == (1, "rank 1 raised: Traceback ...")
