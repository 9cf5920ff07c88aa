"""The transport seam: how the router reaches a worker, and nothing else.

Everything the router sends to a worker goes through a ``Transport``:
``GrpcTransport`` (``grpc_transport.py``: TF Serving's gRPC API over a
grpc.aio channel, for any TF Serving server) or ``FramesTransport``
(``frames_transport.py``: Predict over the project's lean framed protocol to
its own spawned workers, the rest over gRPC).  Tests may substitute a fake
here and only here.  ``connect`` picks one for a worker's address and the
``workers.transport`` setting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2
from shared.errors import Unavailable

if TYPE_CHECKING:
    from router.config import WorkersConfig
    from router.tls import ClientTls


class TransportError(Unavailable):
    """The worker could not be reached or went away mid-call: safe to retry elsewhere."""


class Transport(Protocol):
    async def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse: ...
    async def warmup(self, request: predict_pb2.PredictRequest, timeout: float,
                     pace: str | None = None) -> predict_pb2.PredictResponse: ...
    async def metadata(self, request: metadata_pb2.GetModelMetadataRequest,
                       timeout: float) -> metadata_pb2.GetModelMetadataResponse: ...
    async def status(self, request: status_pb2.GetModelStatusRequest,
                     timeout: float) -> status_pb2.GetModelStatusResponse: ...
    async def reload(self, request: config_pb2.ReloadConfigRequest, timeout: float,
                     pace: str | None = None) -> config_pb2.ReloadConfigResponse: ...
    async def raw(self, method: str, body: bytes, timeout: float) -> bytes: ...
    async def healthy(self, timeout: float) -> bool: ...
    async def close(self) -> None: ...


def connect(name: str, address: str, kind: str = "grpc", frames_address: str | None = None, *,
            tls: ClientTls | None = None, on_tls_error: Callable[[str], None] | None = None) -> Transport:
    """The transport to one worker.

    ``kind``: ``grpc``, or ``frames`` with ``frames_address`` (the worker's
    frames socket, ``unix:PATH``): Predict over frames, the rest over gRPC.
    ``tls``: gRPC over TLS (``workers.tls``), handshake failures reported to ``on_tls_error``.
    """
    from router.transport.grpc_transport import GrpcTransport

    grpc_transport = GrpcTransport(address, tls, on_tls_error)
    if kind == "grpc" or frames_address is None:
        return grpc_transport
    if kind != "frames":
        raise ValueError(f"unknown transport {kind!r}")
    from router.transport.frames_transport import FramesTransport

    return FramesTransport(name, frames_address, grpc_transport)


def transport_for(workers: WorkersConfig, name: str, address: str, tls: ClientTls | None = None,
                  on_tls_error: Callable[[str], None] | None = None) -> Transport:
    """How the router reaches one worker: its own spawned workers take Predict over frames unless
    ``workers.transport: grpc``; everything else gRPC (over TLS with ``workers.tls`` off Unix sockets)."""
    from shared import frames

    if workers.mode == "spawn" and workers.transport != "grpc":
        return connect(name, address, "frames", frames.socket_for(address))
    if tls is not None and not address.startswith("unix:"):
        return connect(name, address, tls=tls, on_tls_error=on_tls_error)
    return connect(name, address)


__all__ = ["Transport", "TransportError", "connect", "transport_for"]
