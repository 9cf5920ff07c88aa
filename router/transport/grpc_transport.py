"""TF Serving's gRPC API over one grpc.aio channel: the transport to any TF Serving server."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2
from router.transport import TransportError
from shared.errors import ServingError, from_code
from shared.marks import PACE_KEY, WARMUP_MARK

MAX_MESSAGE_BYTES = 2**31 - 1
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
    """TF Serving's gRPC API over one grpc.aio channel."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.enable_retries", 0),
                # A restarted worker gets a fresh channel; a shared subchannel
                # would still be in the dead worker's reconnect backoff.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
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

    async def _call(self, stub: Any, request: Any, timeout: float, wait: bool = False,
                    metadata: tuple[tuple[str, str], ...] | None = None) -> Any:
        try:
            return await stub(request, timeout=timeout, wait_for_ready=wait, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc) from exc

    async def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        result: predict_pb2.PredictResponse = await self._call(self._predict, request, timeout)
        return result

    async def warmup(self, request: predict_pb2.PredictRequest, timeout: float,
                     pace: str | None = None) -> predict_pb2.PredictResponse:
        result: predict_pb2.PredictResponse = await self._call(self._predict, request, timeout,
                                                               metadata=_paced(WARMUP_METADATA, pace))
        return result

    async def metadata(self, request: metadata_pb2.GetModelMetadataRequest,
                       timeout: float) -> metadata_pb2.GetModelMetadataResponse:
        # Only the control plane asks (the data plane answers from its cache): marked like warm-up calls.
        result: metadata_pb2.GetModelMetadataResponse = await self._call(self._metadata, request, timeout, True,
                                                                         metadata=CONTROL_METADATA)
        return result

    async def status(self, request: status_pb2.GetModelStatusRequest,
                     timeout: float) -> status_pb2.GetModelStatusResponse:
        result: status_pb2.GetModelStatusResponse = await self._call(self._status, request, timeout, True)
        return result

    async def reload(self, request: config_pb2.ReloadConfigRequest, timeout: float,
                     pace: str | None = None) -> config_pb2.ReloadConfigResponse:
        # Control-plane calls wait for the connection (a worker that just started).
        result: config_pb2.ReloadConfigResponse = await self._call(self._reload, request, timeout, True,
                                                                   metadata=_paced((), pace))
        return result

    async def raw(self, method: str, body: bytes, timeout: float) -> bytes:
        stub = self._raw.get(method)
        if stub is None:
            stub = self._raw[method] = self.channel.unary_unary(method)
        result: bytes = await self._call(stub, body, timeout)
        return result

    async def healthy(self, timeout: float) -> bool:
        try:
            resp = await self._health(self._health_req, timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.status == self._serving)

    async def close(self) -> None:
        await self.channel.close()


def translate(exc: grpc.aio.AioRpcError) -> ServingError:
    """A failed call as the router's error: a lost worker is a TransportError (retried elsewhere)."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE or (
        code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
        and ("Socket closed" in details or "Connection reset" in details or "GOAWAY" in details)
    ):
        return TransportError(f"worker unavailable: {details}")
    return from_code(code, details)
