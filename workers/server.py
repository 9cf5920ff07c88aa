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

Loading, unloading and warm-up run on the load thread, which runs under
SCHED_IDLE: it gets only the CPU time serving leaves unused.  A ReloadConfig
or warm-up call carrying ``x-tfs-router-pace: RUN_MS/PAUSE_MS`` (the router
took this worker out of rotation) runs with those threads paced to short
bursts (``workers.pacer``), so that the conversion never holds the serving
workers back.  A Predict call
carrying the metadata ``x-tfs-router-warmup: 1`` is the router warming a
version on a worker it took out of rotation: it runs on that thread, is
journaled as a "warmup" operation and is not counted as client traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import orjson
from google.protobuf import any_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2
from shared.marks import PACE_KEY, WARMUP_MARK
from shared.errors import CODE_NUMBER, Internal, InvalidArgument, ServingError, Unimplemented
from shared.signature import Signature
from shared.tensor import fill, to_numpy
from workers import pacer as pacer_mod
from workers.frames_server import FramesServer
from workers.journal import Journal
from workers.manager import ModelManager
from workers.pacer import Pacer
from workers.runtime import LoadedVersion

# A servicer context of these untyped (bytes or any message) handlers.
Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger("workers.server")

SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
WORKER_SERVICE = "tfsrouter.Worker"
MAX_MESSAGE_BYTES = 2**31 - 1  # TF Serving accepts up to 2 GB
WARMUP_METADATA = WARMUP_MARK

Handler = Callable[[Any, Context], Awaitable[Any]]


def _guard(fn: Handler) -> Handler:
    """Turn ServingErrors into their status; anything else is INTERNAL, never a crash."""

    async def wrapper(request: Any, context: Context) -> Any:
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


_idle_lock = threading.Lock()
_idle_refused = False


def enter_idle_class() -> None:
    """The load executor's initializer: its threads run under SCHED_IDLE.

    A load or warm-up then only gets CPU time no other thread of the machine
    wants (CFS weight 3, against 15 for nice 19 and 1024 for nice 0), so a
    worker that loads while it serves slows its loading, not its requests
    (seed 000).  CPU only: a starved load thread that holds the GIL still
    holds up the event loop, one reason the router drains a worker first.
    Threads inherit their creator's policy: TF's own pools must exist before
    the first load, which ``runtime.start_threads`` guarantees.  The thread
    also gets its name as its kernel name (``top -H``, /proc/PID/task/*/comm).
    """
    global _idle_refused
    try:
        with open("/proc/thread-self/comm", "w", encoding="ascii") as f:
            f.write(threading.current_thread().name[:15])
    except OSError:
        pass  # only a name for humans
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        with _idle_lock:
            if _idle_refused:
                return
            _idle_refused = True
        log.warning("load threads keep normal CPU priority (SCHED_IDLE refused: %s)", exc)


def _run(loaded: LoadedVersion, request: predict_pb2.PredictRequest) -> tuple[Signature, dict[str, Any]]:
    sig = loaded.signature(request.model_spec.signature_name)
    plan = sig.plan(request.inputs, request.output_filter)
    inputs = request.inputs
    arrays = {n: to_numpy(inputs[n], shape) for n, shape in zip(plan.names, plan.shapes)}
    return sig, loaded.execute(sig, plan.names, plan.outputs, arrays)


def _is_warmup(context: Context) -> bool:
    return WARMUP_METADATA in (context.invocation_metadata() or ())


def _pace(context: Context) -> tuple[float, float] | None:
    """The pacing the router asks for on this call (the worker is out of rotation), if any."""
    for key, value in context.invocation_metadata() or ():
        if key == PACE_KEY and isinstance(value, str):
            return pacer_mod.parse(value)
    return None


class WorkerServices:
    def __init__(self, manager: ModelManager, predict_threads: int, load_executor: ThreadPoolExecutor,
                 journal: Journal, pacer: Pacer | None = None) -> None:
        self.manager = manager
        self.pacer = pacer
        self.health = health.aio.HealthServicer()
        self._pool = (ThreadPoolExecutor(max_workers=predict_threads, thread_name_prefix="predict")
                      if predict_threads > 0 else None)
        self._load_executor = load_executor
        self._journal = journal
        self.requests = 0  # client Predict calls answered, warm-up excluded
        self.requests_by_transport: dict[str, int] = {}  # of those, by the way they came
        self.reload_requests = 0  # HandleReloadConfigRequest calls received
        self._requests_by_version: dict[tuple[str, int], int] = {}

    async def update_health(self, loading: bool = False) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.manager.ready and not loading
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", PREDICTION_SERVICE):
            await self.health.set(service, status)

    # -- PredictionService ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def _paced(self, context: Context) -> AsyncIterator[None]:
        cycle = _pace(context) if self.pacer is not None else None
        if cycle is None or self.pacer is None:
            yield
            return
        async with self.pacer.pacing(*cycle):
            yield

    async def Predict(self, request: predict_pb2.PredictRequest, context: Context) -> predict_pb2.PredictResponse:
        if _is_warmup(context):
            async with self._paced(context):
                return await self._warmup(request)
        return await self.predict(request)

    async def predict(self, request: predict_pb2.PredictRequest, via: str = "grpc") -> predict_pb2.PredictResponse:
        """A client's Predict, whichever way it came (``via``: grpc, or frames from the router)."""
        if self._pool is None:
            # Inline on the loop: no thread hand-off (the router bounds what is in flight).
            return self.predict_inline(request, via)
        spec = request.model_spec
        self._journal.client_started()
        try:
            with self.manager.acquire(spec) as slot:
                loaded = slot.loaded
                assert loaded is not None
                loop = asyncio.get_running_loop()
                sig, result = await loop.run_in_executor(self._pool, _run, loaded, request)
        finally:
            self._journal.client_finished()
        return self._answered(request, slot.version, sig, result, via)

    @property
    def inline(self) -> bool:
        """Predict runs on the event loop (no predict threads): ``predict_inline`` may be called."""
        return self._pool is None

    def predict_inline(self, request: predict_pb2.PredictRequest, via: str = "frames") -> predict_pb2.PredictResponse:
        """A client's Predict run right here, on the caller's thread (the frames server calls it
        as the request's frame arrives: no task per request)."""
        self._journal.client_started()
        try:
            with self.manager.acquire(request.model_spec) as slot:
                loaded = slot.loaded
                assert loaded is not None
                sig, result = _run(loaded, request)
        finally:
            self._journal.client_finished()
        return self._answered(request, slot.version, sig, result, via)

    def _answered(self, request: predict_pb2.PredictRequest, version: int, sig: Signature,
                  result: dict[str, Any], via: str) -> predict_pb2.PredictResponse:
        self.requests += 1
        self.requests_by_transport[via] = self.requests_by_transport.get(via, 0) + 1
        key = (request.model_spec.name, version)
        self._requests_by_version[key] = self._requests_by_version.get(key, 0) + 1
        return self._response(request, version, sig, result)

    async def _warmup(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """A router's warm-up call: on the idle load thread, journaled, not client traffic."""
        with self.manager.acquire(request.model_spec) as slot:
            loaded = slot.loaded
            assert loaded is not None
            with self._journal.record("warmup", request.model_spec.name, slot.version):
                loop = asyncio.get_running_loop()
                sig, result = await loop.run_in_executor(self._load_executor, _run, loaded, request)
        return self._response(request, slot.version, sig, result)

    @staticmethod
    def _response(request: predict_pb2.PredictRequest, version: int, sig: Signature,
                  result: dict[str, Any]) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = sig.name
        for name, value in result.items():
            fill(response.outputs[name], value, sig.outputs[name].dtype)
        return response

    async def GetModelMetadata(
        self, request: metadata_pb2.GetModelMetadataRequest, context: Context
    ) -> metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            bad = [f for f in fields if f != "signature_def"]
            raise InvalidArgument(
                f"Metadata field {bad[0]} is not supported" if bad else "GetModelMetadataRequest must specify at least one metadata_field"
            )
        # The router may read a version's signatures while warming it: not client traffic either.
        client = not _is_warmup(context)
        if client:
            self._journal.client_started()
        try:
            with self.manager.acquire(request.model_spec) as slot:
                assert slot.loaded is not None
                sigmap = metadata_pb2.SignatureDefMap()
                for name, sig in slot.loaded.signature_defs.items():
                    sigmap.signature_def[name].CopyFrom(sig)
        finally:
            if client:
                self._journal.client_finished()
        response = metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = slot.version
        response.metadata["signature_def"].CopyFrom(
            any_pb2.Any(type_url=SIGNATURE_DEF_MAP_URL, value=sigmap.SerializeToString(deterministic=True))
        )
        return response

    async def Unimplemented(self, request: bytes, context: Context) -> bytes:
        raise Unimplemented("this worker serves Predict only; Classify, Regress and MultiInference are not implemented")

    # -- ModelService ----------------------------------------------------------

    async def GetModelStatus(
        self, request: status_pb2.GetModelStatusRequest, context: Context
    ) -> status_pb2.GetModelStatusResponse:
        return self.manager.status(request.model_spec)

    async def HandleReloadConfigRequest(
        self, request: config_pb2.ReloadConfigRequest, context: Context
    ) -> config_pb2.ReloadConfigResponse:
        response = config_pb2.ReloadConfigResponse()
        self.reload_requests += 1
        if request.config.WhichOneof("config") != "model_config_list":
            raise InvalidArgument("ServerConfig must contain a model_config_list")
        try:
            async with self._paced(context):
                await self.manager.reload(request.config)
        except ServingError as exc:
            response.status.error_code = CODE_NUMBER[exc.code]  # type: ignore[assignment]
            response.status.error_message = exc.message
        finally:
            await self.update_health()
        return response

    # -- tfsrouter.Worker ------------------------------------------------------

    async def Stats(self, request: bytes, context: Context) -> bytes:
        """JSON: pid, requests (client Predicts answered), peak_in_flight (the most client calls in flight
        at once), requests_by_transport ({grpc|frames: count}),
        client_requests_by_version
        ({model: {version: count}}, summing to requests), executors ({model: {version:
        count}}), reload_requests (ReloadConfig calls received), now and operations (workers.journal: the last loads, unloads and
        warm-ups, times on the machine's CLOCK_MONOTONIC like ``now``)."""
        counts = self.manager.executor_counts()
        by_version: dict[str, dict[str, int]] = {}
        for (model, version), n in self._requests_by_version.items():
            by_version.setdefault(model, {})[str(version)] = n
        return orjson.dumps(
            {
                "pid": os.getpid(),
                "requests": self.requests,
                "peak_in_flight": self._journal.peak_in_flight,
                "requests_by_transport": self.requests_by_transport,
                "reload_requests": self.reload_requests,
                "client_requests_by_version": by_version,
                "executors": {m: {str(v): n for v, n in vs.items()} for m, vs in counts.items()},
                "now": time.monotonic(),
                "operations": list(self._journal.operations),
            }
        )

    # -- wiring ----------------------------------------------------------------

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn: Handler, req: Any = None, resp: Any = None) -> grpc.RpcMethodHandler[Any, Any]:
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


def tls_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS for the worker's gRPC port from PEM files (read once, at start); with ``client_ca_file``
    clients (the router) must present a certificate that CA signed."""
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    ca = read(client_ca_file) if client_ca_file else None
    return grpc.ssl_server_credentials([(read(key_file), read(cert_file))], root_certificates=ca,
                                       require_client_auth=ca is not None)


async def serve(
    listen: str,
    config: config_pb2.ModelServerConfig | None,
    *,
    predict_threads: int,
    max_concurrent_rpcs: int,
    load_threads: int = 1,
    poll_s: float = 0.0,
    on_bound: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    pacer: Pacer | None = None,
    frames_listen: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Run the worker until ``stop`` is set; loads ``config`` after the port is bound.

    ``credentials``: serve gRPC over TLS on ``listen`` (``tls_credentials``).

    ``frames_listen`` (``unix:PATH``): also serve Predict over the router's
    framed protocol there (``workers.frames_server``), bound before the
    listening line, so the router may use it as soon as it sees the worker.

    With ``poll_s`` > 0 the worker also re-applies ``config`` that often, so it
    loads new version directories by itself (TF Serving's
    --file_system_poll_wait_seconds), until a ReloadConfig replaces it.
    """
    load_pool = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="load",
                                   initializer=enter_idle_class)
    journal = Journal()
    manager = ModelManager(load_pool, journal)
    services = WorkerServices(manager, predict_threads, load_pool, journal, pacer)
    server = grpc.aio.server(options=server_options(), maximum_concurrent_rpcs=max_concurrent_rpcs)
    server.add_generic_rpc_handlers(services.handlers())
    health_pb2_grpc.add_HealthServicer_to_server(services.health, server)
    port = server.add_secure_port(listen, credentials) if credentials is not None else server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise Internal(f"could not bind {listen}")
    bound = listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}"
    has_models = config is not None and bool(config.model_config_list.config)
    await services.update_health(loading=has_models)
    await server.start()
    frames_server = await _serve_frames(frames_listen, services) if frames_listen else None
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
        while poll_s > 0 and config is not None and has_models and not services.reload_requests:
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
                break
            except asyncio.TimeoutError:
                pass
            try:
                await manager.reload(config)
            except ServingError as exc:
                log.warning("storage poll: %s", exc.message)
            await services.update_health()
        await stop.wait()
    finally:
        log.info("shutting down")
        if frames_server is not None:
            frames_server.close()
        await services.health.enter_graceful_shutdown()
        await server.stop(grace=5.0)
        services.close()
        load_pool.shutdown(wait=False, cancel_futures=True)


async def _serve_frames(listen: str, services: WorkerServices) -> asyncio.AbstractServer:
    if not listen.startswith("unix:"):
        raise InvalidArgument(f"--frames-listen takes unix:PATH, not {listen!r}")
    path = listen[len("unix:"):]
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket of an earlier process
    predict = functools.partial(services.predict, via="frames")
    inline = services.predict_inline if services.inline else None
    return await asyncio.get_running_loop().create_unix_server(lambda: FramesServer(predict, inline=inline), path)
