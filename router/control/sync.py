"""Worker sync: tell one worker which versions to hold, and read back what it holds.

The router decides which versions every worker holds (DESIGN decision 1):
one ``HandleReloadConfigRequest`` naming every configured model with a
``specific`` version policy, then ``GetModelStatus`` per model to read each
version's state (a worker that failed a load reports END with the error),
then the signatures of every version now AVAILABLE (fetched once per
version for the whole pool).  Nothing here decides *when*: that is the
rollout's job (``plan.py``, ``rollout.py``).
"""

from __future__ import annotations

import asyncio
import os

import grpc
from collections.abc import Iterable, Mapping

from shared.errors import CODE_BY_NUMBER, NotFound, ServingError
from protos import config_pb2, status_pb2
from router.config import ModelConfig
from router.registry import Registry
from router.pool import Backend

State = status_pb2.ModelVersionStatus


class LoadFailed(ServingError):
    """A version a worker was told to hold is not AVAILABLE on it."""

    def __init__(self, model: str, version: int, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.version = version
        if code is not None:
            self.code = code


class WorkerRestarted(ServingError):
    """The worker process was replaced while a step ran on it."""


def reload_request(models: Iterable[ModelConfig], hold: Mapping[str, Iterable[int]]) -> config_pb2.ReloadConfigRequest:
    req = config_pb2.ReloadConfigRequest()
    for m in models:
        cfg = req.config.model_config_list.config.add(name=m.name, base_path=os.path.abspath(m.base_path))
        cfg.model_platform = "tensorflow"
        cfg.model_version_policy.specific.versions.extend(sorted(hold.get(m.name, ())))
    return req


async def refresh(backend: Backend, models: Iterable[ModelConfig], registry: Registry, generation: int,
                  timeout: float) -> None:
    """Read the worker's per-version status and the signatures of its AVAILABLE versions."""
    backend.versions = await read_status(backend, models, registry, generation, timeout)


async def read_status(backend: Backend, models: Iterable[ModelConfig], registry: Registry, generation: int,
                      timeout: float) -> dict[str, dict[int, status_pb2.ModelVersionStatus]]:
    """The worker's per-version status (signatures of AVAILABLE versions fetched), not yet applied."""
    transport = backend.transport
    if transport is None or backend.generation != generation:
        raise WorkerRestarted(f"worker {backend.name} restarted")
    statuses: dict[str, dict[int, status_pb2.ModelVersionStatus]] = {}
    for m in models:
        req = status_pb2.GetModelStatusRequest()
        req.model_spec.name = m.name
        try:
            resp = await transport.status(req, timeout)
        except NotFound:
            statuses[m.name] = {}
            continue
        statuses[m.name] = {s.version: s for s in resp.model_version_status}
        for s in resp.model_version_status:
            if s.state == State.AVAILABLE:
                await registry.fetch_metadata(transport, m.name, s.version)
    if backend.generation != generation:
        raise WorkerRestarted(f"worker {backend.name} restarted")
    return statuses


async def hold(backend: Backend, models: Iterable[ModelConfig], versions: Mapping[str, frozenset[int]],
               registry: Registry, generation: int, timeout: float, pace: str | None = None) -> None:
    """Make the worker hold exactly ``versions``; LoadFailed names the first version that is not AVAILABLE.

    ``pace``: the worker is out of rotation and may convert in bursts (``shared.marks.PACE_KEY``).
    """
    models = list(models)
    transport = backend.transport
    if transport is None or backend.generation != generation:
        raise WorkerRestarted(f"worker {backend.name} restarted")
    async with asyncio.timeout(timeout):
        response = await transport.reload(reload_request(models, versions), timeout, pace=pace)
        await refresh(backend, models, registry, generation, timeout)
    for model, wanted in sorted(versions.items()):
        for version in sorted(wanted):
            status = backend.versions.get(model, {}).get(version)
            if status is not None and status.state == State.AVAILABLE:
                continue
            if status is not None and status.status.error_message:
                code = CODE_BY_NUMBER.get(status.status.error_code)
                raise LoadFailed(model, version, status.status.error_message, code)
            detail = response.status.error_message or "the worker does not report it AVAILABLE"
            raise LoadFailed(model, version, f"version {version} of {model} did not load: {detail}")
