"""REST frontend: TF Serving's REST API, plus health and metrics endpoints.

    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            (status)
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata
    GET  /healthz  /readyz  /metrics  /monitoring/prometheus/metrics

Paths are matched with TF Serving's own patterns, errors are ``{"error":
"..."}`` with its status mapping, and every predict response carries the
serving version in ``x-model-version``.  JSON goes through orjson; dtypes
come from the cached signature.  No TensorFlow here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format

from protos import metadata_pb2, model_pb2, predict_pb2, status_pb2
from router.admission import Admission
from router.config import Config
from router.registry import Registry
from router.dataplane import DataPlane, Resolved
from router.frontends.balanced import BalancedAcceptor, ConnectionShares
from router.frontends.served import Frontend
from shared.errors import BindError, InvalidArgument, NotFound, ServingError, Unimplemented
from router.metrics import Metrics
from router.tls import ServerTls, peercert_identity
from router.wire import rest_json
from shared.signature import find_signature
from shared.tensor import fill, to_numpy

logger = logging.getLogger("router.rest")

# ASCII digits only, as TF Serving: Python's \d would take "١" (an Arabic-Indic one) as version 1.
_PREDICT = re.compile(r"(?i)/v1/models/([^/:]+)(?:/versions/([0-9]+)|/labels/([^/:]+))?:(classify|regress|predict)")
_MODEL = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:/versions/([0-9]+)|/labels/([^/:]+))?(?:/(metadata))?")
JSON = "application/json"
OPENAPI = Path(__file__).with_name("openapi.json")  # this API, described: served at /v1/openapi.json


def _spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name)
    if version is not None:
        try:
            spec.version.value = int(version)
        except ValueError:
            raise InvalidArgument(f"Failed to convert version: {version} to numeric.") from None
    elif label is not None:
        spec.version_label = label
    return spec


def _to_json(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


class _Refused(asyncio.Protocol):
    """A connection past rest.max_connections: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _ConnectionLimit:
    """The listener's protocol factory: aiohttp's server, up to ``limit`` open connections."""

    def __init__(self, server: web.Server, limit: int, on_refused: Callable[[], None]) -> None:
        self.server = server
        self.limit = limit
        self.on_refused = on_refused

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            self.on_refused()
            return _Refused()
        protocol: asyncio.BaseProtocol = self.server()
        return protocol


class RestFrontend:
    def __init__(self, config: Config, dataplane: DataPlane, control: Registry, metrics: Metrics,
                 admission: Admission, *, tls: ServerTls | None = None) -> None:
        self.config = config
        self.tls = tls
        self.reuse_port = False  # a data-plane process shares the port with the others (router/procs.py)
        # ... or accepts from the control plane's socket, connections spread evenly (balanced.py)
        self.shared_listener: tuple[socket.socket, ConnectionShares, int] | None = None
        self._acceptor: BalancedAcceptor | None = None
        self.metrics_source: Callable[[], Awaitable[bytes]] | None = None
        self.readiness_detail: Callable[[], dict[str, Any]] | None = None
        self.dp = dataplane
        self.control = control
        self.metrics = metrics
        self.admission = admission
        self._listener: asyncio.AbstractServer | None = None
        self.refused_connections = 0
        self.front = Frontend("rest", metrics, frozenset(m.name for m in config.models))
        self.accepting = False
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def active(self) -> int:
        return self.front.active

    def set_models(self, config: Config) -> None:
        self.config = config
        self.front.model_names = frozenset(m.name for m in config.models)

    def _tenant(self, request: web.Request) -> str | None:
        """The tenant's name: the verified client certificate's (quotas.tenant_from: client_cert) or the header."""
        if self.config.quotas.tenant_from == "client_cert":
            transport = request.transport
            return peercert_identity(transport.get_extra_info("peercert")) if transport is not None else None
        return request.headers.get(self.admission.header)

    # -- handlers ------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        with self.front.request("unknown") as r:
            headers: dict[str, str] = {}
            try:
                path = request.path
                if request.method == "POST":
                    m = _PREDICT.fullmatch(path)
                    if m is None:
                        raise NotFound(f"Malformed request: POST {path}")
                    r.model, version, label, verb = m.groups()
                    r.api = verb.capitalize()
                    if r.api != "Predict":
                        raise Unimplemented(f"{verb} is not supported by this router's REST API; use gRPC")
                    deadline = time.monotonic() + self.config.limits.default_deadline_s
                    # Admitted before the body is even read: a refused request costs nothing more.
                    r.ticket = await self.admission.admit(self._tenant(request), r.model, deadline)
                    body, headers = await self._predict(request, _spec(r.model, version, label), deadline)
                elif request.method == "GET" and path.rstrip("/") == "/v1/models":
                    r.api = "ListModels"  # TF Serving answers this path as malformed (tensorflow/serving#795)
                    body = orjson.dumps({"models": [self._listing(m.name) for m in self.config.models]})
                elif request.method == "GET":
                    m = _MODEL.fullmatch(path)
                    if m is None or m.group(1) is None:
                        raise NotFound(f"Malformed request: GET {path}")
                    r.model, version, label, metadata = m.groups()
                    spec = _spec(r.model, version, label)
                    if metadata:
                        r.api = "GetModelMetadata"
                        body = orjson.dumps(self._metadata_json(spec))
                    else:
                        r.api = "GetModelStatus"
                        body = orjson.dumps(_to_json(self.dp.status(status_pb2.GetModelStatusRequest(model_spec=spec))))
                else:
                    raise InvalidArgument(f"Unsupported HTTP method: {request.method}")
                return web.Response(body=body, content_type=JSON, headers=headers)
            except ServingError as exc:
                r.code = exc.code.name
                return web.Response(body=rest_json.error_body(exc.message), status=exc.http_status,
                                    content_type=JSON, headers=exc.headers())
            except web.HTTPException as exc:  # aiohttp's own refusals, e.g. a body over max_body_bytes
                r.code = "RESOURCE_EXHAUSTED" if exc.status == 413 else "INVALID_ARGUMENT"
                return web.Response(body=rest_json.error_body(exc.reason), status=exc.status, content_type=JSON)
            except Exception as exc:
                r.code = "INTERNAL"
                logger.exception("unexpected error on %s %s", request.method, request.path)
                return web.Response(body=rest_json.error_body(f"{type(exc).__name__}: {exc}"), status=500,
                                    content_type=JSON)

    async def _predict(self, request: web.Request, spec: model_pb2.ModelSpec,
                       deadline: float) -> tuple[bytes, dict[str, str]]:
        headers = request.headers.get  # case-insensitive, as the model's routing rules match
        # Resolved once: the version's signature parses the body, and the data plane routes by the same answer.
        chosen_by_router = spec.WhichOneof("version_choice") is None
        if chosen_by_router and self.control.held:
            await self.control.settled(spec.name)
        version = self.control.resolve(spec, headers)
        meta = self.control.metadata(spec.name, version)

        def input_dtypes(signature_name: str) -> dict[str, int]:
            sig = find_signature(meta.signatures, signature_name)
            return {name: s.dtype for name, s in sig.inputs.items()}

        parsed = rest_json.parse_predict_body(await request.read(), input_dtypes)
        sig = find_signature(meta.signatures, parsed.signature_name)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = spec.name
        req.model_spec.version.value = version
        req.model_spec.signature_name = sig.name
        for name, array in parsed.inputs.items():
            fill(req.inputs[name], array, sig.inputs[name].dtype if name in sig.inputs else None)
        resp = await self.dp.predict(req, deadline, headers, Resolved(version, sig, chosen_by_router))
        outputs = {name: to_numpy(t) for name, t in resp.outputs.items()}
        body = rest_json.format_predict_response(outputs, parsed.row_format)
        return body, {"x-model-version": str(resp.model_spec.version.value)}

    def _metadata_json(self, spec: model_pb2.ModelSpec) -> dict[str, Any]:
        resp = self.dp.metadata(metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"]))
        sigmap = metadata_pb2.SignatureDefMap.FromString(resp.metadata["signature_def"].value)
        return {
            "model_spec": {"name": resp.model_spec.name, "signature_name": "",
                           "version": str(resp.model_spec.version.value)},
            "metadata": {"signature_def": _to_json(sigmap)},
        }

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status": "ok"}', content_type=JSON)

    def _listing(self, model: str) -> dict[str, Any]:
        """One model in ``GET /v1/models``: its versions' states (as GetModelStatus words them), the
        version unversioned requests get, and its labels."""
        try:
            status = _to_json(self.dp.status(status_pb2.GetModelStatusRequest(
                model_spec=model_pb2.ModelSpec(name=model))))
        except NotFound:  # no version loaded anywhere yet
            status = {"model_version_status": []}
        default = self.control.default.get(model)
        return {"name": model, "default_version": str(default) if default is not None else None,
                "labels": {label: str(v) for label, v in sorted(self.control.labels.get(model, {}).items())},
                **status}

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.accepting and self.control.ready()
        available = {m.name: sorted(self.control.pool.available_versions(m.name)) for m in self.config.models}
        doc: dict[str, Any] = {"ready": ready, "available_versions": available}
        if self.readiness_detail is not None:  # e.g. the state store's (router/app.py); serving goes on
            doc.update(self.readiness_detail())
        body = orjson.dumps(doc)
        return web.Response(body=body, status=200 if ready else 503, content_type=JSON)

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        if self.metrics_source is not None:  # a data-plane process: every process's, summed
            body = await self.metrics_source()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    # -- lifecycle -----------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.rest.max_body_bytes)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/monitoring/prometheus/metrics", self._metrics)
        app.router.add_route("*", r"/v1/models{tail:[\s\S]*}", self._models)  # newlines too: always our JSON errors
        app.router.add_get("/v1/openapi.json", self._openapi)
        return app

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI.read_bytes(), content_type=JSON)

    async def start(self) -> int:
        cfg = self.config.rest
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                    max_line_size=cfg.max_header_bytes, max_field_size=cfg.max_header_bytes,
                                    max_headers=cfg.max_headers)
        await self.runner.setup()
        assert self.runner.server is not None

        def refused() -> None:
            self.refused_connections += 1

        # Our own listener (not a TCPSite) so that connections past the limit are closed at once.
        factory = _ConnectionLimit(self.runner.server, cfg.max_connections, refused)
        ssl_context = self.tls.ssl_context() if self.tls is not None else None
        if self.shared_listener is not None:
            sock, shares, index = self.shared_listener
            server = self.runner.server
            self._acceptor = BalancedAcceptor(sock, factory, open_connections=lambda: len(server.connections),
                                              shares=shares, index=index, ssl_context=ssl_context)
            self._acceptor.start()
            self.port = sock.getsockname()[1]
            return self.port
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                factory, cfg.host, cfg.port, reuse_address=True, reuse_port=self.reuse_port or None,
                backlog=min(cfg.max_connections, 4096), ssl=ssl_context)
        except OSError as exc:
            raise BindError(f"cannot listen for REST on {cfg.host}:{cfg.port} ({exc.strerror}); "
                            "choose another with --rest-port or rest.port") from exc
        sockets: tuple[Any, ...] = tuple(self._listener.sockets or ())
        self.port = sockets[0].getsockname()[1] if sockets else cfg.port
        return self.port

    async def stop(self) -> None:
        self.accepting = False
        if self._acceptor is not None:
            self._acceptor.close()
        if self._listener is not None:
            self._listener.close()  # no new connections; the open ones finish below
        if self.runner is not None:
            await self.runner.cleanup()
        if self._listener is not None:
            await self._listener.wait_closed()
