"""TF Serving's gRPC API over one grpc.aio channel: the transport to any TF Serving server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2

from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2
from router.transport import TransportError
from shared.errors import ServingError, from_code
from shared.marks import PACE_KEY, WARMUP_MARK

if TYPE_CHECKING:
    from router.tls import ClientTls

MAX_MESSAGE_BYTES = 2**31 - 1
# A channel replaced by new TLS credentials: its calls in flight get this long to finish.
OLD_CHANNEL_GRACE_S = 60.0
# Control-plane calls the project's worker keeps out of its client counts (and
# runs on its idle-priority load thread); any other TF Serving server ignores the key.
CONTROL_METADATA = WARMUP_METADATA = (WARMUP_MARK,)


def _paced(metadata: tuple[tuple[str, str], ...], pace: str | None) -> tuple[tuple[str, str], ...] | None:
    if pace is None:
        return metadata or None
    return (*metadata, (PACE_KEY, pace))


def _deterministic(message: Any) -> bytes:
    # Sorted map keys: the inputs map reaches the worker in one canonical order.
    data: bytes = message.SerializeToString(deterministic=True)
    return data


class GrpcTransport:
    """TF Serving's gRPC API over one grpc.aio channel (TLS with ``tls``: ``workers.tls``).

    When ``tls``'s files change, the next call opens a new channel with the new
    credentials; the old one is closed once its calls in flight are done.  A
    call that fails its TLS handshake (a certificate that does not verify) is
    reported to ``on_tls_error`` with gRPC's reason; never retried in plaintext.
    """

    def __init__(self, address: str, tls: ClientTls | None = None,
                 on_tls_error: Callable[[str], None] | None = None) -> None:
        self.address = address
        self._tls = tls
        self._on_tls_error = on_tls_error
        self._closing: set[asyncio.Task[None]] = set()
        self._open()

    def _open(self) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),
            # A restarted worker gets a fresh channel; a shared subchannel
            # would still be in the dead worker's reconnect backoff.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        tls = self._tls
        if tls is None:
            self.channel = grpc.aio.insecure_channel(self.address, options=options)
            self._tls_generation = 0
        else:
            self._tls_generation = tls.generation
            self.channel = grpc.aio.secure_channel(self.address, tls.credentials(), options=options + tls.options())
        ch = self.channel
        self._predict = ch.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                       _deterministic, predict_pb2.PredictResponse.FromString)
        self._metadata = ch.unary_unary("/tensorflow.serving.PredictionService/GetModelMetadata",
                                        _deterministic, metadata_pb2.GetModelMetadataResponse.FromString)
        self._status = ch.unary_unary("/tensorflow.serving.ModelService/GetModelStatus",
                                      _deterministic, status_pb2.GetModelStatusResponse.FromString)
        self._reload = ch.unary_unary("/tensorflow.serving.ModelService/HandleReloadConfigRequest",
                                      _deterministic, config_pb2.ReloadConfigResponse.FromString)
        self._health_req = health_pb2.HealthCheckRequest(service="")
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._health = ch.unary_unary("/grpc.health.v1.Health/Check",
                                      health_pb2.HealthCheckRequest.SerializeToString,
                                      health_pb2.HealthCheckResponse.FromString)
        self._raw: dict[str, Any] = {}

    def _fresh(self) -> None:
        """A new channel when the TLS files changed since this one opened."""
        if self._tls is not None and self._tls.generation != self._tls_generation:
            old = self.channel
            self._open()
            task = asyncio.get_running_loop().create_task(old.close(grace=OLD_CHANNEL_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _failed(self, exc: grpc.aio.AioRpcError) -> None:
        if self._on_tls_error is not None and self._tls is not None and exc.code() == grpc.StatusCode.UNAVAILABLE:
            from router.tls import is_tls_failure

            details = exc.details() or ""
            if is_tls_failure(details):
                self._on_tls_error(details)

    async def _call(self, stub: str, request: Any, timeout: float, wait: bool = False,
                    metadata: tuple[tuple[str, str], ...] | None = None) -> Any:
        self._fresh()
        try:
            return await getattr(self, stub)(request, timeout=timeout, wait_for_ready=wait, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            self._failed(exc)
            raise translate(exc) from exc

    async def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        result: predict_pb2.PredictResponse = await self._call("_predict", request, timeout)
        return result

    async def warmup(self, request: predict_pb2.PredictRequest, timeout: float,
                     pace: str | None = None) -> predict_pb2.PredictResponse:
        result: predict_pb2.PredictResponse = await self._call("_predict", request, timeout,
                                                               metadata=_paced(WARMUP_METADATA, pace))
        return result

    async def metadata(self, request: metadata_pb2.GetModelMetadataRequest,
                       timeout: float) -> metadata_pb2.GetModelMetadataResponse:
        # Only the control plane asks (the data plane answers from its cache): marked like warm-up calls.
        result: metadata_pb2.GetModelMetadataResponse = await self._call("_metadata", request, timeout, True,
                                                                         metadata=CONTROL_METADATA)
        return result

    async def status(self, request: status_pb2.GetModelStatusRequest,
                     timeout: float) -> status_pb2.GetModelStatusResponse:
        result: status_pb2.GetModelStatusResponse = await self._call("_status", request, timeout, True)
        return result

    async def reload(self, request: config_pb2.ReloadConfigRequest, timeout: float,
                     pace: str | None = None) -> config_pb2.ReloadConfigResponse:
        # Control-plane calls wait for the connection (a worker that just started).
        result: config_pb2.ReloadConfigResponse = await self._call("_reload", request, timeout, True,
                                                                   metadata=_paced((), pace))
        return result

    async def raw(self, method: str, body: bytes, timeout: float) -> bytes:
        self._fresh()
        stub = self._raw.get(method)
        if stub is None:
            stub = self._raw[method] = self.channel.unary_unary(method)
        try:
            result: bytes = await stub(body, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self._failed(exc)
            raise translate(exc) from exc
        return result

    async def healthy(self, timeout: float) -> bool:
        self._fresh()
        try:
            resp = await self._health(self._health_req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self._failed(exc)
            return False
        return bool(resp.status == self._serving)

    async def close(self) -> None:
        await self.channel.close()
        for task in list(self._closing):
            task.cancel()


def translate(exc: grpc.aio.AioRpcError) -> ServingError:
    """A failed call as the router's error: a lost worker is a TransportError (retried elsewhere)."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE or (
        code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
        and ("Socket closed" in details or "Connection reset" in details or "GOAWAY" in details)
    ):
        return TransportError(f"worker unavailable: {details}")
    return from_code(code, details)
