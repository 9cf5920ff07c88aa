"""Worker discovery by DNS: ``dns:NAME:PORT`` addresses, re-resolved.

A static address may name a DNS entry (a Kubernetes headless Service lists
one A record per ready pod).  Every ``workers.dns_refresh_s`` each such name
is resolved again and the pool follows:

- a new address is added as a worker; it joins the rotation only once it
  reports AVAILABLE versions (the control plane's usual start-up path);
- an address missing from ``workers.dns_drop_after`` successful lookups in a
  row is drained (out of rotation, its in-flight requests finish) and dropped;
- a lookup that fails changes nothing: a worker never flaps out and back in
  on one bad answer from a resolver.

The resolver is injected (``Resolver``), so tests and other service
registries can stand in for DNS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger("router.discovery")

# (host, port) -> every "ip:port" it names right now; raises OSError when the lookup fails.
Resolver = Callable[[str, int], Awaitable[list[str]]]


def parse(address: str) -> tuple[str, int] | None:
    """("name", port) for a ``dns:NAME:PORT`` address, None for a plain one."""
    if not address.startswith("dns:"):
        return None
    host, _, port = address[4:].rpartition(":")
    return host, int(port)


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = set()
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        out.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(out)


class Discovery:
    def __init__(self, entries: Iterable[str], *, resolver: Resolver, refresh_s: float, drop_after: int,
                 add: Callable[[str], None], drop: Callable[[str], None]) -> None:
        self.entries = [e for e in entries if parse(e) is not None]
        self.resolver = resolver
        self.refresh_s = refresh_s
        self.drop_after = drop_after
        self._add = add
        self._drop = drop
        self.members: dict[str, set[str]] = {e: set() for e in self.entries}  # entry -> addresses in the pool
        self._missing: dict[str, int] = {}  # address -> successful lookups in a row without it
        self.lookups = 0
        self.failures = 0

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        """Resolve every entry once and add or drop workers accordingly."""
        for entry in self.entries:
            host, port = parse(entry)  # type: ignore[misc]
            self.lookups += 1
            try:
                found = set(await self.resolver(host, port))
            except (OSError, asyncio.TimeoutError) as exc:
                self.failures += 1
                log.warning("%s: lookup failed (%s); keeping %d worker(s)", entry, exc, len(self.members[entry]))
                continue
            members = self.members[entry]
            for address in sorted(found - members):
                if any(address in m for m in self.members.values()):
                    continue  # already in the pool through another entry
                log.info("%s: new worker %s", entry, address)
                members.add(address)
                self._add(address)
            for address in sorted(found & members):
                self._missing.pop(address, None)
            for address in sorted(members - found):
                self._missing[address] = self._missing.get(address, 0) + 1
                if self._missing[address] >= self.drop_after:
                    log.info("%s: worker %s is gone (missing from %d lookups); draining it",
                             entry, address, self._missing[address])
                    members.discard(address)
                    del self._missing[address]
                    self._drop(address)  # drains in the background
