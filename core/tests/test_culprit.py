"""Which rank's error is its own, and which only echoes a peer: read from the error texts that reach the driver.

The texts are what torch.distributed's Gloo and NCCL process groups and Horovod raise; the conformance suite checks
the whole path (a real stuck rank blamed, with its stack) on every backend.
"""

from __future__ import annotations

import pytest

from raylane.culprit import echoes_a_peer, gave_up_waiting, straggler_report

GLOO_TIMEOUT = (
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
    "5000ms for recv operation to complete"
)
# What FairScale's ShardedDataParallel got from Gloo when its peer never joined (seen in CI): a wait on an async handle.
GLOO_ASYNC_TIMEOUT = "RuntimeError: Application timeout caused pair closure"
NCCL_TIMEOUT = "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE) ran for"
HOROVOD_SHUT_DOWN = "horovod.common.exceptions.HorovodInternalError: Horovod has been shut down."
PEER_CLOSED = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]"
OWN_ERRORS = [
    "RuntimeError: injected failure on rank 1",
    "requests.exceptions.ReadTimeout: HTTPSConnectionPool(host='s3'): Read timed out. (read timeout=5)",
    "ValueError: Timed out waiting for the data loader",
]


@pytest.mark.parametrize("text", [GLOO_TIMEOUT, GLOO_ASYNC_TIMEOUT, NCCL_TIMEOUT, HOROVOD_SHUT_DOWN])
def test_a_collective_that_gave_up_waiting_echoes_a_peer(text: str) -> None:
    assert gave_up_waiting(text)
    assert echoes_a_peer(text)


def test_a_closed_connection_echoes_a_peer_without_saying_the_peer_is_slow() -> None:
    assert echoes_a_peer(PEER_CLOSED)
    assert not gave_up_waiting(PEER_CLOSED)


@pytest.mark.parametrize("text", OWN_ERRORS)
def test_a_ranks_own_error_is_its_own_even_when_it_mentions_a_timeout(text: str) -> None:
    assert not echoes_a_peer(text)
    assert not gave_up_waiting(text)


def test_the_straggler_report_names_who_waited_how_long_and_where_the_straggler_was() -> None:
    stack = '  File "model.py", line 42, in training_step\n    time.sleep(3600)\n'
    report = straggler_report(3, 5.0, [0, 1, 2], stack)
    assert "Rank(s) 0, 1, 2 gave up after waiting 5 s (collective_timeout)" in report
    assert "rank 3 never joined" in report
    assert report.endswith("in training_step\n    time.sleep(3600)")
    assert "did not say where it was" in straggler_report(3, 5.0, [0], None)
