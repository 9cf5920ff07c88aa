"""One listening socket, several acceptors, connections spread by count (router/frontends/balanced.py).

The acceptors here share one loop (as the data-plane processes share one
socket); real TCP connections on loopback.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

from router.frontends.balanced import BalancedAcceptor, ConnectionShares, listening_socket


class _Held(asyncio.Protocol):
    def __init__(self, held: list[asyncio.BaseTransport]) -> None:
        self.held = held

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.held.append(transport)


def _acceptor(sock: socket.socket, shares: ConnectionShares, index: int,
              held: list[asyncio.BaseTransport]) -> BalancedAcceptor:
    acceptor = BalancedAcceptor(sock, lambda: _Held(held), open_connections=lambda: len(held), shares=shares,
                                index=index, ssl_context=None)
    acceptor.start()
    return acceptor


async def _connect_one_by_one(port: int, n: int, accepted: Callable[[], int]) -> list[asyncio.StreamWriter]:
    writers = []
    base = accepted()
    for i in range(base, base + n):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        for _ in range(500):  # until one acceptor holds it
            if accepted() == i + 1:
                break
            await asyncio.sleep(0.002)
        assert accepted() == i + 1
    return writers


def test_connections_are_spread_evenly(tmp_path: Path) -> None:
    async def run() -> None:
        sock = listening_socket("127.0.0.1", 0, 64)
        port = sock.getsockname()[1]
        shares = ConnectionShares(tmp_path / "shares", 2, create=True)
        held: list[list[asyncio.BaseTransport]] = [[], []]
        # the first acceptor registered is woken first: alone it would take nearly every connection
        acceptors = [_acceptor(sock, shares, 0, held[0]), _acceptor(sock.dup(), shares, 1,
                                                                     held[1])]
        writers = await _connect_one_by_one(port, 20, lambda: len(held[0]) + len(held[1]))
        assert (len(held[0]), len(held[1])) == (10, 10)
        assert shares.snapshot() == [10, 10]
        # connections that close free a share: the next ones go to the process that lost them
        for t in held[0][:4]:
            t.close()
        del held[0][:4]
        await asyncio.sleep(0.25)  # the counts are published every REFRESH_S
        writers += await _connect_one_by_one(port, 4, lambda: len(held[0]) + len(held[1]))
        assert (len(held[0]), len(held[1])) == (10, 10)
        for w in writers:
            w.close()
        for a in acceptors:
            a.close()
        sock.close()
        assert shares.snapshot() == [-1, -1]  # closed: nobody waits for them

    asyncio.run(run())


def test_a_process_that_does_not_accept_only_delays_connections(tmp_path: Path) -> None:
    """The other slot claims 0 connections but nobody accepts for it (stuck, or dead and not yet marked):
    every connection is still taken, each after DEFER_MAX_S at most."""

    async def run() -> None:
        sock = listening_socket("127.0.0.1", 0, 64)
        shares = ConnectionShares(tmp_path / "shares", 2, create=True)
        shares.set(1, 0)
        held: list[asyncio.BaseTransport] = []
        acceptor = _acceptor(sock, shares, 0, held)
        writers = await _connect_one_by_one(sock.getsockname()[1], 5, lambda: len(held))
        assert acceptor.deferred > 0  # it did leave them to the other first
        shares.gone(1)
        deferred = acceptor.deferred
        writers += await _connect_one_by_one(sock.getsockname()[1], 5, lambda: len(held))
        assert acceptor.deferred == deferred  # a process gone is not waited for
        assert len(held) == 10
        for w in writers:
            w.close()
        acceptor.close()

    asyncio.run(run())
