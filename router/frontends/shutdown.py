"""How the gRPC and REST frontends stop: drained first, then closed (the router and each data-plane process)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.frontends.grpc_server import GrpcFrontend
    from router.frontends.http_server import RestFrontend

# After a drain that answered requests, how long connections stay open for clients to read them.
SHUTDOWN_LINGER_S = 0.5


async def drain_and_stop(grpc: GrpcFrontend, rest: RestFrontend, grace: float,
                         before_stop: Callable[[], None] | None = None) -> None:
    """Refuse new calls, let the calls in flight finish (up to ``grace``), then stop both servers.

    Drained before the gRPC server stops: its stop closes every connection as soon as the last
    call returns, and a connection closed under a client still reading a large answer is reset
    (the client loses the answer's tail). So new calls are refused, the calls in flight finish,
    and their answers get time to be read before the server stops.
    """
    rest.accepting = False
    with contextlib.suppress(Exception):  # health state is best effort during shutdown
        await grpc.set_serving(False)
    grpc.draining = True
    loop = asyncio.get_running_loop()
    end = loop.time() + grace
    busy = grpc.active + rest.active
    while (grpc.active or rest.active) and loop.time() < end:
        await asyncio.sleep(0.01)
    if busy:
        await asyncio.sleep(min(SHUTDOWN_LINGER_S, max(0.0, end - loop.time())))
    if before_stop is not None:
        before_stop()
    await asyncio.gather(grpc.stop(max(0.0, end - loop.time())), rest.stop(), return_exceptions=True)
