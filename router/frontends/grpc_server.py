"""gRPC frontend: TF Serving's PredictionService and ModelService, unchanged for clients.

Served with generic handlers under the official method paths and the
project's own messages (no TensorFlow import).  grpc.aio with
``maximum_concurrent_rpcs``: past it gRPC itself answers RESOURCE_EXHAUSTED,
so a burst can never grow threads or memory without bound (seed 001).
Message limits are TF Serving's 2 GB, not gRPC's 4 MB default.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2
from router.admission import Admission
from router.config import Config
from router.dataplane import DataPlane
from router.frontends.served import Frontend
from shared.errors import BindError, InvalidArgument, ServingError, Unavailable, Unimplemented
from router.metrics import Metrics
from router.tls import ServerTls, grpc_client_identity

# A servicer context of these untyped (bytes or any message) handlers.
Context = grpc.aio.ServicerContext[Any, Any]

logger = logging.getLogger("router.grpc")

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"


def _parser(message_type: Any) -> Callable[[bytes], Any]:
    name = message_type.DESCRIPTOR.full_name.replace("tfsrouter.", "tensorflow.serving.")

    def parse(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except DecodeError as exc:
            raise InvalidArgument(f"the request is not a valid {name} message ({len(raw)} bytes): {exc}") from None

    return parse


def _model_of_raw(body: bytes) -> str:
    """Classify/Regress: their ModelSpec is field 1, like GetModelStatusRequest's (read without the rest)."""
    try:
        return str(status_pb2.GetModelStatusRequest.FromString(body).model_spec.name)
    except DecodeError:
        raise InvalidArgument(f"the request is not a valid message ({len(body)} bytes)") from None


def _metadata_value(context: Context, name: str) -> str | None:
    """A request metadata value by lower-case key (gRPC keys arrive in lower case)."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else None
    return None


def _trailers(exc: ServingError) -> tuple[tuple[str, str], ...]:
    retry = exc.headers().get("Retry-After")
    return (("retry-after", retry),) if retry else ()


class GrpcFrontend:
    def __init__(self, config: Config, dataplane: DataPlane, metrics: Metrics, admission: Admission, *,
                 tls: ServerTls | None = None) -> None:
        self.config = config
        self.tls = tls
        self.reuse_port = False  # a data-plane process shares the port with the others (router/procs.py)
        self.dp = dataplane
        self.admission = admission
        self.metrics = metrics
        self.front = Frontend("grpc", metrics, frozenset(m.name for m in config.models))
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.draining = False  # shutting down: new calls are refused, calls in flight finish

    @property
    def active(self) -> int:
        return self.front.active

    def set_models(self, config: Config) -> None:
        self.config = config
        self.front.model_names = frozenset(m.name for m in config.models)

    def _deadline(self, context: Context) -> float:
        # None without a client deadline (grpc.aio does that, whatever its stubs say).
        remaining: float | None = context.time_remaining()
        if remaining is None:
            remaining = self.config.limits.default_deadline_s
        return time.monotonic() + remaining

    def _handler(self, api: str, parse: Callable[[bytes], Any] | None, model_of: Callable[[Any], str],
                 fn: Callable[..., Awaitable[Any]], *, admit: bool = False,
                 with_context: bool = False) -> Callable[[Any, Context], Awaitable[Any]]:
        """One RPC: parse (a message that does not parse is INVALID_ARGUMENT, not UNKNOWN), admit
        (data-plane calls: the tenant's, the model's and the router's quotas), call, answer."""
        admission = self.admission
        front = self.front
        by_cert = self.config.quotas.tenant_from == "client_cert"

        async def handle(raw: bytes, context: Context) -> Any:
            with front.request(api) as r:
                try:
                    if self.draining:
                        raise Unavailable("the server is shutting down")
                    request = raw if parse is None else parse(raw)
                    r.model = model = model_of(request)
                    deadline = self._deadline(context)
                    if admit:
                        tenant = grpc_client_identity(context.auth_context()) if by_cert \
                            else _metadata_value(context, admission.header)
                        r.ticket = await admission.admit(tenant, model, deadline)
                    if with_context:
                        return await fn(request, deadline, context)
                    return await fn(request, deadline)
                except ServingError as exc:
                    r.code = exc.code.name
                    await context.abort(exc.code, exc.message, _trailers(exc))
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    r.code = "INTERNAL"
                    logger.exception("unexpected error in %s", api)
                    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

        return handle

    async def _predict(self, request: predict_pb2.PredictRequest, deadline: float,
                       context: Context) -> predict_pb2.PredictResponse:
        def header(name: str) -> str | None:
            # Read only when the model's routing asks (by lower-case name).
            return _metadata_value(context, name)

        return await self.dp.predict(request, deadline, header)

    async def _metadata(self, request: metadata_pb2.GetModelMetadataRequest, deadline: float) -> metadata_pb2.GetModelMetadataResponse:
        return self.dp.metadata(request)

    async def _status(self, request: status_pb2.GetModelStatusRequest, deadline: float) -> status_pb2.GetModelStatusResponse:
        return self.dp.status(request)

    async def _reload(self, request: config_pb2.ReloadConfigRequest, deadline: float) -> config_pb2.ReloadConfigResponse:
        raise Unimplemented(
            "the router decides which versions its workers hold (from its config and the model base "
            "paths); change the config or the version directories instead"
        )

    def _forward(self, method: str) -> Callable[[bytes, float], Awaitable[bytes]]:
        path = f"/{PREDICTION_SERVICE}/{method}"

        async def forward(body: bytes, deadline: float) -> bytes:
            if method == "MultiInference":
                return await self.dp.forward_any(path, body, deadline)
            return await self.dp.forward(path, body, deadline)

        return forward

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(api: str, fn: Any, req: Any = None, resp: Any = None,
                  model_of: Callable[[Any], str] = lambda r: r.model_spec.name, *, admit: bool = False,
                  with_context: bool = False) -> grpc.RpcMethodHandler[Any, Any]:
            # No request_deserializer: the handler parses, so a malformed message is the client's error.
            return grpc.unary_unary_rpc_method_handler(
                self._handler(api, _parser(req) if req else None, model_of, fn, admit=admit,
                              with_context=with_context),
                response_serializer=resp.SerializeToString if resp else None,
            )

        raw_model: Callable[[Any], str] = _model_of_raw
        prediction = {
            "Predict": unary("Predict", self._predict, predict_pb2.PredictRequest, predict_pb2.PredictResponse,
                             admit=True, with_context=True),
            "GetModelMetadata": unary("GetModelMetadata", self._metadata, metadata_pb2.GetModelMetadataRequest,
                                      metadata_pb2.GetModelMetadataResponse),
            "Classify": unary("Classify", self._forward("Classify"), model_of=raw_model, admit=True),
            "Regress": unary("Regress", self._forward("Regress"), model_of=raw_model, admit=True),
            "MultiInference": unary("MultiInference", self._forward("MultiInference"), model_of=lambda b: "",
                                    admit=True),
        }
        model = {
            "GetModelStatus": unary("GetModelStatus", self._status, status_pb2.GetModelStatusRequest,
                                    status_pb2.GetModelStatusResponse),
            "HandleReloadConfigRequest": unary("HandleReloadConfigRequest", self._reload, config_pb2.ReloadConfigRequest,
                                               config_pb2.ReloadConfigResponse),
        }
        return [
            grpc.method_handlers_generic_handler(PREDICTION_SERVICE, prediction),
            grpc.method_handlers_generic_handler(MODEL_SERVICE, model),
        ]

    def _backstop(self) -> int:
        """grpc.aio's own concurrency limit: past the admission gates (which answer RESOURCE_EXHAUSTED)."""
        limits = self.config.limits
        return self.config.grpc.max_concurrent_rpcs or (limits.max_inflight + limits.max_waiting + 1024)

    async def start(self) -> int:
        cfg = self.config.grpc
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                ("grpc.max_metadata_size", cfg.max_metadata_bytes),
                # Calls gRPC holds before the application takes them: past its
                # defaults (1000, hard 3000) a burst is CANCELLED inside gRPC,
                # unseen; the admission gates must see every call to refuse it
                # properly (RESOURCE_EXHAUSTED), so these sit above the backstop.
                ("grpc.server.max_pending_requests", self._backstop()),
                ("grpc.server.max_pending_requests_hard_limit", 2 * self._backstop()),
                *((("grpc.max_concurrent_streams", cfg.max_concurrent_streams),)
                  if cfg.max_concurrent_streams else ()),
            ],
            maximum_concurrent_rpcs=self._backstop(),
        )
        server.add_generic_rpc_handlers(self.handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            address = f"{cfg.host}:{cfg.port}"
            self.port = server.add_secure_port(address, self.tls.grpc_credentials()) if self.tls is not None \
                else server.add_insecure_port(address)
        except RuntimeError as exc:
            raise BindError(f"cannot listen for gRPC on {cfg.host}:{cfg.port} (in use?); "
                            "choose another with --grpc-port or grpc.port") from exc
        await self.set_serving(False)
        await server.start()
        self.server = server
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", PREDICTION_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
