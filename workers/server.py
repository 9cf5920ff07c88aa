"""The worker's gRPC services under TF Serving's method paths.

PredictionService (Predict, GetModelMetadata; Classify, Regress and
MultiInference answer UNIMPLEMENTED), ModelService (GetModelStatus,
HandleReloadConfigRequest), grpc.health.v1 (NOT_SERVING until every
configured model has an AVAILABLE version) and a small ``tfsrouter.Worker/Stats``
method.  Served with generic handlers and the project's own messages, so any
TF Serving client can call a worker directly.

grpc.aio: no thread per request.  Concurrency is bounded twice: by the
server's ``maximum_concurrent_rpcs`` and by the fixed pool of threads that
run TF (a request waits for a free thread; it never spawns one), or, by
default, by running TF inline on the event loop, one call at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import orjson
from google.protobuf import any_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2
from common.errors import CODE_NUMBER, Internal, InvalidArgument, ServingError, Unimplemented
from common.tensor import fill, to_numpy
from workers.manager import ModelManager

log = logging.getLogger("workers.server")

SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
WORKER_SERVICE = "tfsrouter.Worker"
MAX_MESSAGE_BYTES = 2**31 - 1  # TF Serving accepts up to 2 GB

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _guard(fn: Handler) -> Handler:
    """Turn ServingErrors into their status; anything else is INTERNAL, never a crash."""

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except ServingError as exc:
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("unexpected error in %s", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    wrapper.__name__ = fn.__name__
    return wrapper


class WorkerServices:
    def __init__(self, manager: ModelManager, predict_threads: int) -> None:
        self.manager = manager
        self.health = health.aio.HealthServicer()
        self._pool = (ThreadPoolExecutor(max_workers=predict_threads, thread_name_prefix="predict")
                      if predict_threads > 0 else None)
        self.requests = 0

    async def update_health(self, loading: bool = False) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.manager.ready and not loading
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", PREDICTION_SERVICE):
            await self.health.set(service, status)

    # -- PredictionService ---------------------------------------------------

    async def Predict(self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        with self.manager.acquire(spec) as slot:
            loaded = slot.loaded
            assert loaded is not None
            sig = loaded.signature(spec.signature_name)
            plan = sig.plan(request.inputs, request.output_filter)
            names, outputs = plan.names, plan.outputs
            arrays = {n: to_numpy(request.inputs[n]) for n in names}
            if self._pool is None:
                # Inline on the loop: no thread hand-off (the router bounds what is in flight).
                result = loaded.execute(sig, names, outputs, arrays)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, loaded.execute, sig, names, outputs, arrays)
        self.requests += 1
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = slot.version
        response.model_spec.signature_name = sig.name
        for name, value in result.items():
            fill(response.outputs[name], value, sig.outputs[name].dtype)
        return response

    async def GetModelMetadata(
        self, request: metadata_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            bad = [f for f in fields if f != "signature_def"]
            raise InvalidArgument(
                f"Metadata field {bad[0]} is not supported" if bad else "GetModelMetadataRequest must specify at least one metadata_field"
            )
        with self.manager.acquire(request.model_spec) as slot:
            assert slot.loaded is not None
            sigmap = metadata_pb2.SignatureDefMap()
            for name, sig in slot.loaded.signature_defs.items():
                sigmap.signature_def[name].CopyFrom(sig)
        response = metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = slot.version
        response.metadata["signature_def"].CopyFrom(
            any_pb2.Any(type_url=SIGNATURE_DEF_MAP_URL, value=sigmap.SerializeToString(deterministic=True))
        )
        return response

    async def Unimplemented(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise Unimplemented("this worker serves Predict only; Classify, Regress and MultiInference are not implemented")

    # -- ModelService ----------------------------------------------------------

    async def GetModelStatus(
        self, request: status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> status_pb2.GetModelStatusResponse:
        return self.manager.status(request.model_spec)

    async def HandleReloadConfigRequest(
        self, request: config_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> config_pb2.ReloadConfigResponse:
        response = config_pb2.ReloadConfigResponse()
        if request.config.WhichOneof("config") != "model_config_list":
            raise InvalidArgument("ServerConfig must contain a model_config_list")
        try:
            await self.manager.reload(request.config)
        except ServingError as exc:
            response.status.error_code = CODE_NUMBER[exc.code]  # type: ignore[assignment]
            response.status.error_message = exc.message
        finally:
            await self.update_health()
        return response

    # -- tfsrouter.Worker ------------------------------------------------------

    async def Stats(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        counts = self.manager.executor_counts()
        return orjson.dumps(
            {
                "pid": os.getpid(),
                "requests": self.requests,
                "executors": {m: {str(v): n for v, n in vs.items()} for m, vs in counts.items()},
            }
        )

    # -- wiring ----------------------------------------------------------------

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn: Handler, req: Any = None, resp: Any = None) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                _guard(fn),
                request_deserializer=req.FromString if req else None,
                response_serializer=resp.SerializeToString if resp else None,
            )

        prediction = {
            "Predict": unary(self.Predict, predict_pb2.PredictRequest, predict_pb2.PredictResponse),
            "GetModelMetadata": unary(
                self.GetModelMetadata, metadata_pb2.GetModelMetadataRequest, metadata_pb2.GetModelMetadataResponse
            ),
            "Classify": unary(self.Unimplemented),
            "Regress": unary(self.Unimplemented),
            "MultiInference": unary(self.Unimplemented),
        }
        model = {
            "GetModelStatus": unary(
                self.GetModelStatus, status_pb2.GetModelStatusRequest, status_pb2.GetModelStatusResponse
            ),
            "HandleReloadConfigRequest": unary(
                self.HandleReloadConfigRequest, config_pb2.ReloadConfigRequest, config_pb2.ReloadConfigResponse
            ),
        }
        return [
            grpc.method_handlers_generic_handler(PREDICTION_SERVICE, prediction),
            grpc.method_handlers_generic_handler(MODEL_SERVICE, model),
            grpc.method_handlers_generic_handler(WORKER_SERVICE, {"Stats": unary(self.Stats)}),
        ]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]


async def serve(
    listen: str,
    config: config_pb2.ModelServerConfig | None,
    *,
    predict_threads: int,
    max_concurrent_rpcs: int,
    load_threads: int = 1,
    on_bound: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the worker until ``stop`` is set; loads ``config`` after the port is bound."""
    load_pool = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="load")
    manager = ModelManager(load_pool)
    services = WorkerServices(manager, predict_threads)
    server = grpc.aio.server(options=server_options(), maximum_concurrent_rpcs=max_concurrent_rpcs)
    server.add_generic_rpc_handlers(services.handlers())
    health_pb2_grpc.add_HealthServicer_to_server(services.health, server)
    port = server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise Internal(f"could not bind {listen}")
    bound = listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}"
    has_models = config is not None and bool(config.model_config_list.config)
    await services.update_health(loading=has_models)
    await server.start()
    if on_bound:
        on_bound(bound)
    stop = stop or asyncio.Event()
    try:
        if config is not None and has_models:
            try:
                await manager.reload(config)
            except ServingError as exc:
                log.error("initial model config: %s", exc.message)
            await services.update_health()
        await stop.wait()
    finally:
        log.info("shutting down")
        await services.health.enter_graceful_shutdown()
        await server.stop(grace=5.0)
        services.close()
        load_pool.shutdown(wait=False, cancel_futures=True)
