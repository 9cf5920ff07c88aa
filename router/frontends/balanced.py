"""One REST listening socket shared by the data-plane processes, its connections spread evenly.

With ``SO_REUSEPORT`` the kernel hashes each new connection to one process's
socket: 64 keep-alive connections from one load generator came out 38/26, and
the process with 38 answered every request of its clients ~1.5x slower (its
loop has more to do), which is the router's p99.  Instead the control plane
listens once and every data plane accepts from that socket; each process
publishes how many connections it holds in a small shared file
(:class:`ConnectionShares`), and a process that holds more than another
leaves the next connection to it for a few milliseconds
(:class:`BalancedAcceptor`).  The counts only steer: a process that does not
accept in ``DEFER_MAX_S`` (busy, stuck, gone) loses its turn, so no
connection waits longer than that.

gRPC keeps ``SO_REUSEPORT``: grpc.aio accepts in its C core, with no way to
hand it a socket or pace its accepts.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import select
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("router.balanced")

GONE = 2**62  # the slot of a process that is not running: nobody defers to it
DEFER_S = 0.002  # a process that holds more connections looks again after this
DEFER_MAX_S = 0.02  # ... and accepts anyway after this: the counts steer, they never block
REFRESH_S = 0.1  # closed connections show in the shared count within this
SLOT = 8


class ConnectionShares:
    """Open connections per data-plane process: one signed 64-bit slot each, in a shared file."""

    def __init__(self, path: Path, count: int, *, create: bool = False) -> None:
        self.count = count
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, count * SLOT)
            self._map = mmap.mmap(fd, count * SLOT)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("q")
        if create:
            for i in range(count):
                self._slots[i] = GONE

    def set(self, index: int, connections: int) -> None:
        self._slots[index] = connections

    def gone(self, index: int) -> None:
        self._slots[index] = GONE

    def fewest_but(self, index: int) -> int:
        """The fewest connections any other running process holds (GONE: no other is running)."""
        return min((self._slots[i] for i in range(self.count) if i != index), default=GONE)

    def snapshot(self) -> list[int]:
        return [int(n) if n != GONE else -1 for n in self._slots]

    def close(self) -> None:
        self._slots.release()
        self._map.close()


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """The control plane's REST socket: listening, never accepted from by the control plane itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class BalancedAcceptor:
    """Accepts from a socket shared with other processes, taking a connection only when this process
    holds no more than the least loaded of the others (or when they left it waiting DEFER_MAX_S)."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol], *,
                 open_connections: Callable[[], int], shares: ConnectionShares, index: int,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.sock = sock
        self.factory = factory
        self.open_connections = open_connections
        self.shares = shares
        self.index = index
        self.ssl_context = ssl_context
        self.accepted = 0
        self.deferred = 0
        self._pending = 0  # accepted, handshake or protocol set-up not finished
        self._deferred_since: float | None = None
        self._reading = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._refresher: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self.sock.setblocking(False)
        self._publish()
        self._read(True)

    def _held(self) -> int:
        return self.open_connections() + self._pending

    def _publish(self) -> None:
        if self._closed:
            return
        self.shares.set(self.index, self._held())
        self._refresher = self._loop.call_later(REFRESH_S, self._publish)

    def _read(self, on: bool) -> None:
        if on and not self._reading and not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._readable)
        elif not on and self._reading:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = on and not self._closed

    def _readable(self) -> None:
        held = self._held()
        self.shares.set(self.index, held)
        if held > self.shares.fewest_but(self.index):
            now = time.monotonic()
            if self._deferred_since is None:
                self._deferred_since = now
            if now - self._deferred_since < DEFER_MAX_S:
                self.deferred += 1
                self._read(False)
                self._loop.call_later(DEFER_S, self._look_again)
                return
        self._deferred_since = None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # another process took it
        except OSError as exc:  # out of descriptors, say: the connection stays queued; try again shortly
            log.warning("REST accept failed: %s", exc)
            self._read(False)
            self._loop.call_later(0.1, self._read, True)
            return
        conn.setblocking(False)
        self.accepted += 1
        self._pending += 1
        self.shares.set(self.index, held + 1)
        task = self._loop.create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _look_again(self) -> None:
        if self._closed:
            return
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:  # someone else took it: the next connection starts a new wait
            self._deferred_since = None
        self._read(True)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl_context)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("REST connection dropped before it was served: %s", exc)
            conn.close()
        finally:
            self._pending -= 1

    def close(self) -> None:
        """No new connections from this process (the socket stays open for the others)."""
        self._read(False)
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
        self.shares.gone(self.index)
        self.sock.close()
