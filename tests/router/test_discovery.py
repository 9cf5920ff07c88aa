"""DNS discovery and passive control, without processes: a fake resolver, the pure choices."""

from __future__ import annotations

import asyncio

import pytest

from router.config import ConfigError, from_dict
from router.control.passive import choose_default
from router.discovery import Discovery, parse


class FakeDns:
    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.fail = False
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if self.fail:
            raise OSError("temporary failure in name resolution")
        return list(self.addresses)


def discovery(dns: FakeDns, drop_after: int = 2) -> tuple[Discovery, list[str], list[str]]:
    added: list[str] = []
    dropped: list[str] = []
    d = Discovery(["dns:workers.ns.svc:8500", "10.0.0.9:8500"], resolver=dns, refresh_s=1.0,
                  drop_after=drop_after, add=added.append, drop=dropped.append)
    return d, added, dropped


def test_parse() -> None:
    assert parse("dns:workers.models.svc:8500") == ("workers.models.svc", 8500)
    assert parse("10.0.0.5:8500") is None and parse("unix:/tmp/w.sock") is None


def test_new_addresses_join_and_vanished_ones_leave_after_repeated_absence() -> None:
    dns = FakeDns("10.0.0.1:8500", "10.0.0.2:8500")
    d, added, dropped = discovery(dns)
    asyncio.run(d.refresh())
    assert added == ["10.0.0.1:8500", "10.0.0.2:8500"] and dns.asked == [("workers.ns.svc", 8500)]
    dns.addresses = ["10.0.0.2:8500", "10.0.0.3:8500"]
    asyncio.run(d.refresh())
    assert added[-1] == "10.0.0.3:8500" and dropped == []  # absent once: kept
    asyncio.run(d.refresh())
    assert dropped == ["10.0.0.1:8500"]
    asyncio.run(d.refresh())
    assert dropped == ["10.0.0.1:8500"] and len(added) == 3  # no repeats


def test_a_failed_lookup_changes_nothing_and_an_address_that_comes_back_is_kept() -> None:
    dns = FakeDns("10.0.0.1:8500", "10.0.0.2:8500")
    d, added, dropped = discovery(dns)
    asyncio.run(d.refresh())
    dns.fail = True
    for _ in range(5):
        asyncio.run(d.refresh())
    assert dropped == [] and d.failures == 5 and d.members["dns:workers.ns.svc:8500"] == {"10.0.0.1:8500",
                                                                                          "10.0.0.2:8500"}
    dns.fail = False
    dns.addresses = ["10.0.0.1:8500"]
    asyncio.run(d.refresh())  # 10.0.0.2 missing once
    dns.addresses = ["10.0.0.1:8500", "10.0.0.2:8500"]
    asyncio.run(d.refresh())  # back: its count starts over
    dns.addresses = ["10.0.0.1:8500"]
    asyncio.run(d.refresh())
    assert dropped == [] and added == ["10.0.0.1:8500", "10.0.0.2:8500"]


def test_choose_default_follows_the_majority_rule() -> None:
    assert choose_default(None, {}, None) is None
    assert choose_default(None, {1: 2}, None) == 1
    assert choose_default(1, {1: 2, 2: 1}, None) == 1  # one worker of two has 2: not yet
    assert choose_default(1, {1: 2, 2: 2}, None) == 2
    assert choose_default(1, {1: 1, 2: 1}, None) == 2  # the old one unloaded on one worker
    assert choose_default(2, {1: 2}, None) == 1  # the default vanished: the newest served
    assert choose_default(1, {1: 2, 2: 2}, (1,)) == 1  # a specific policy limits the choice
    assert choose_default(2, {1: 1, 2: 1, 3: 0}, None) == 2


def test_config_keys() -> None:
    base = {"models": [{"name": "m", "base_path": "/m"}]}
    cfg = from_dict({**base, "workers": {"mode": "static", "control": "passive",
                                         "addresses": ["dns:workers:8500", "10.0.0.1:8500"]}})
    assert cfg.workers.control == "passive" and cfg.workers.dns_refresh_s == 5.0
    for workers, message in (({"control": "passive"}, "passive needs workers.mode: static"),
                             ({"control": "sometimes"}, "workers.control"),
                             ({"mode": "static", "addresses": ["dns:workers"]}, "dns:NAME:PORT"),
                             ({"mode": "static", "addresses": ["10.0.0.1:1"], "dns_refresh_s": 0},
                              "workers.dns_refresh_s")):
        with pytest.raises(ConfigError, match=message):
            from_dict({**base, "workers": workers})
