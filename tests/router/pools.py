"""A pool of scripted workers for the data plane's and the registry's unit tests (no sockets)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from protos import model_pb2, status_pb2
from router.config import Config, from_dict
from router.pool import READY, Backend, Pool
from tests.router.fakes import FakeTransport

T = TypeVar("T")
State = status_pb2.ModelVersionStatus
AVAILABLE, END, LOADING_V = State.AVAILABLE, State.END, State.LOADING




def config(*models: dict[str, Any]) -> Config:
    return from_dict({"models": list(models) or [{"name": "m", "base_path": "/models/m"}]})


def vstatus(version: int, state: int = AVAILABLE, error: str = "") -> status_pb2.ModelVersionStatus:
    s = State(version=version, state=state)
    if error:
        s.status.error_code = status_pb2.UNKNOWN
        s.status.error_message = error
    return s


def backend(name: str, held: dict[str, dict[int, int]] | None = None, *, state: str = READY,
            max_inflight: int = 4, transport: FakeTransport | None = None) -> Backend:
    versions = {m: {v: vstatus(v, s) for v, s in vs.items()} for m, vs in (held or {}).items()}
    return Backend(name, f"unix:/tmp/{name}.sock", max_inflight, transport=transport or FakeTransport(name),
                   state=state, versions=versions)


def fake(b: Backend) -> FakeTransport:
    assert isinstance(b.transport, FakeTransport)
    return b.transport


def make_pool(*backends: Backend, max_queued: int = 16) -> Pool:
    return Pool(backends, max_queued=max_queued, rng=random.Random(0))


def spec(name: str = "m", version: int | None = None, label: str | None = None) -> model_pb2.ModelSpec:
    s = model_pb2.ModelSpec(name=name)
    if version is not None:
        s.version.value = version
    if label is not None:
        s.version_label = label
    return s


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 5))


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds
