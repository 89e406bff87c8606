"""raylane's errors survive the copies and pickles that Ray and Ray Tune make of them."""

from __future__ import annotations

import copy
import pickle

from ray import cloudpickle

from raylane import WorkerError


def test_worker_error_keeps_rank_and_node_through_copy_and_pickle() -> None:
    error = WorkerError("rank 1 died", rank=1, node_ip="10.0.0.2", node_id="abc123")
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error)), cloudpickle.loads(cloudpickle.dumps(error))):
        assert type(clone) is WorkerError
        assert str(clone) == "rank 1 died"
        assert (clone.rank, clone.node_ip, clone.node_id) == (1, "10.0.0.2", "abc123")
