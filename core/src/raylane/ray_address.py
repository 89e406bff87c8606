"""Connecting to the cluster ``RAY_ADDRESS`` names, for a script that lets raylane connect.

With a Ray Client address (``ray://head:10001``) the head's proxy starts one server process for each client. With
grpcio 1.80 or later some of those processes crash before they start (ray-project/ray#63202, grpc/grpc#43055; a head
started with ``GRPC_ENABLE_FORK_SUPPORT=0`` does not lose them), and ``ray.init`` fails with
``ConnectionAbortedError``. That failure happens before raylane or the script has run anything on the cluster, and a
new connection gets a new server process, so raylane tries again. A script that calls ``ray.init`` itself gets Ray's
own behaviour.
"""

from __future__ import annotations

import logging

import ray

log = logging.getLogger(__name__)

# A loaded head lost two servers in a row here; each lost one costs its client up to a minute, so five attempts bound
# the wait at a few minutes and ride out such a run of losses.
CONNECT_ATTEMPTS = 5
# Ray Client's ``ConnectionAbortedError`` carries the proxy's traceback. A server lost this way ends in one of three
# places, depending on when the proxy notices that the process died: at once, while it checks the process's command
# line, or after waiting for the server to answer (30 s, RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S on the head).
INIT_FAILED = "Initialization failure from server"
SERVER_LOST = ("Starting Ray client server failed", "in start_specific_server", "Proxy failed to Connect to backend")


def names_a_lost_client_server(error_text: str) -> bool:
    """Whether Ray Client's error says that ``ray.init`` failed because the head lost the server process it started
    for this client (and for no other reason): the failure a new connection does not repeat."""
    return INIT_FAILED in error_text and any(symptom in error_text for symptom in SERVER_LOST)


def connect(attempts: int = CONNECT_ATTEMPTS) -> None:
    """``ray.init()`` for ``RAY_ADDRESS``, again (up to ``attempts`` in all) when the head lost the client's server."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init()
            return
        except ConnectionAbortedError as error:
            if attempt == attempts or not names_a_lost_client_server(str(error)):
                raise
            log.warning(
                "raylane: the Ray Client server the head started for this driver did not come up "
                "(ray-project/ray#63202; a head started with GRPC_ENABLE_FORK_SUPPORT=0 does not lose them); "
                "connecting again (attempt %d of %d)",
                attempt + 1,
                attempts,
            )
