"""The admin endpoint: pool and rollout status, and the operator's commands.

    GET  /v1/admin/status                          workers, models, the running rollout, history
    POST /v1/admin/models/{model}/rollout          {"version": V}: roll out V (retrying it if it failed);
                                                   {}: follow the version policy again (retry failed versions)
    POST /v1/admin/models/{model}/rollback         {"version": V} or {}: back to the previous version
    POST /v1/admin/rollout/abort                   roll the running rollout back (before its switch)
    POST /v1/admin/workers/{worker}/drain          out of rotation until undrained
    POST /v1/admin/workers/{worker}/undrain
    GET  /v1/admin/models/{model}/routing          the routing block (rules, split, sticky_header, progressive)
    PUT  /v1/admin/models/{model}/routing          a new one, validated and applied at once
    POST /v1/admin/models/{model}/canary           {"weight": N}: the canary's share of the split
    POST /v1/admin/models/{model}/promote          the canary gets all traffic and becomes the default
    POST /v1/admin/models/{model}/abort            the canary's weight goes to 0
    POST /v1/admin/models/{model}/state/reset      drop what was set at run time: back to the config

It listens on 127.0.0.1:8502 by default (``admin.host``, ``admin.port``).
With ``TFS_ROUTER_ADMIN_TOKEN`` set, every request needs ``Authorization:
Bearer <token>`` (401 otherwise; compared in constant time, never logged).
On any address but a loopback one it refuses to start without both the token
and TLS (``admin.tls`` or the top-level ``tls``): a token sent in the clear
is anyone's.  A client address that fails authentication
``AUTH_FAILURES_ALLOWED`` times within ``AUTH_WINDOW_S`` gets 429 (with
Retry-After) until the window has passed, whatever it sends.  Errors are ``{"error": "..."}`` with 400 (bad
request), 404 (no such model or worker) or 409 (does not fit the rollout's
state).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from shared.errors import BindError
from router.config import AdminConfig, ConfigError
from router.control.canary import CanaryController
from router.control.rollout import Controller, RolloutBusy
from router.state import StateConflict, StoreUnavailable
from router.tls import ServerTls
from router.traffic import RoutingError

log = logging.getLogger("router.admin")

TOKEN_ENV = "TFS_ROUTER_ADMIN_TOKEN"
JSON = "application/json"
AUTH_FAILURES_ALLOWED = 5  # failed authentications per client address and window ...
AUTH_WINDOW_S = 60.0  # ... after which that address is refused (429) until the window ends
AUTH_TRACKED_MAX = 10_000  # client addresses remembered; the oldest are forgotten first


def admin_token() -> str:
    return os.environ.get(TOKEN_ENV, "")


async def _nothing(_: str) -> None:
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status)


class _AuthFailures:
    """Failed authentications per client address, in fixed windows, in bounded memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # address -> (window start, failures)

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: it may now)."""
        entry = self._seen.get(address)
        if entry is None:
            return 0.0
        start, failures = entry
        left = start + AUTH_WINDOW_S - self._clock()
        if left <= 0:
            del self._seen[address]
            return 0.0
        return left if failures >= AUTH_FAILURES_ALLOWED else 0.0

    def failed(self, address: str) -> int:
        now = self._clock()
        start, failures = self._seen.pop(address, (now, 0))
        if now - start >= AUTH_WINDOW_S:
            start, failures = now, 0
        self._seen[address] = (start, failures + 1)
        while len(self._seen) > AUTH_TRACKED_MAX:
            self._seen.popitem(last=False)
        return failures + 1


class AdminFrontend:
    def __init__(self, config: AdminConfig, controller: Controller, canary: CanaryController, *,
                 token: str, tls: ServerTls | None = None) -> None:
        if config.port >= 0 and not is_loopback(config.host) and (not token or tls is None):
            missing = " and ".join(w for w, ok in (("TLS (admin.tls or tls: cert_file, key_file)", tls is not None),
                                                   (f"a secret token in {TOKEN_ENV}", bool(token))) if not ok)
            raise ConfigError(f"admin.host: {config.host} is not a loopback address: the admin API there "
                              f"needs {missing}")
        self.config = config
        self.controller = controller
        self.canary = canary
        self.tls = tls
        self._token = token.encode()
        self._failures = _AuthFailures()
        # After a command: keep what changed (router/state.py) and wait until every data-plane
        # process applied it (router/procs.py); the argument says who ("admin ADDRESS").
        self.after_command: Callable[[str], Awaitable[Any]] = _nothing
        # POST /v1/admin/models/{model}/state/reset: the model back to its config.
        self.reset_state: Callable[[str], dict[str, Any]] | None = None
        # Extra sections of GET /v1/admin/status (the data-plane processes).
        self.extra_status: Callable[[], dict[str, Any]] = dict
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._token:
            address = request.remote or "unknown"
            wait = self._failures.blocked_for(address)
            if wait > 0:
                return web.Response(body=orjson.dumps({"error": "too many failed authentications; try later"}),
                                    status=429, content_type=JSON, headers={"Retry-After": str(int(wait) + 1)})
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self._token):
                if self._failures.failed(address) == AUTH_FAILURES_ALLOWED:
                    log.warning("admin API: %d failed authentications from %s within %.0fs; refusing it "
                                "until the window ends", AUTH_FAILURES_ALLOWED, address, AUTH_WINDOW_S)
                return _error("missing or wrong admin token (Authorization: Bearer ...)", 401)
        try:
            response: web.StreamResponse = await handler(request)
            if request.method != "GET" and response.status < 300:
                # kept across restarts, and applied by every data-plane process, before the answer
                await self.after_command(f"admin {request.remote or 'unknown'}")
            return response
        except RolloutBusy as exc:
            return _error(str(exc), 409)
        except StateConflict as exc:
            return _error(f"not changed: {exc}", 409)
        except StoreUnavailable as exc:
            return _error(f"not changed: the state store is unreachable ({exc}); the router serves on with "
                          "its last state", 503)
        except RoutingError as exc:
            return _error(f"routing not changed: {exc}", 400)
        except (ValueError, KeyError) as exc:
            return _error(str(exc).strip("'\""), 400)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        return body

    async def _body(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request)
        unknown = set(body) - {"version"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; only 'version' is accepted")
        version = body.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
            raise ValueError(f"version must be a non-negative integer, got {version!r}")
        return body

    def _model(self, request: web.Request) -> str:
        name = request.match_info["model"]
        if self.controller.config.model(name) is None:
            raise web.HTTPNotFound(body=orjson.dumps({"error": f"no model named {name!r}"}), content_type=JSON)
        return name

    def _started(self, rollout: Any, what: str) -> web.Response:
        if rollout is None:
            return _json({"rollout": None, "message": f"nothing to do: {what} is already served"})
        return _json({"rollout": rollout.to_json()}, 202)

    async def _status(self, request: web.Request) -> web.Response:
        status = self.controller.status()
        for m in status["models"]:
            m["routing"] = self.canary.status(m["name"])
        status.update(self.extra_status())
        return _json(status)

    async def _reset_state(self, request: web.Request) -> web.Response:
        if self.reset_state is None:
            return _error("this router keeps no runtime state", 404)
        return _json(self.reset_state(self._model(request)))

    async def _rollout(self, request: web.Request) -> web.Response:
        model = self._model(request)
        version = (await self._body(request)).get("version")
        rollout = self.controller.request(model, version, "requested by an operator")
        return self._started(rollout, f"{model} version {version}" if version is not None else model)

    async def _rollback(self, request: web.Request) -> web.Response:
        model = self._model(request)
        version = (await self._body(request)).get("version")
        rollout = self.controller.rollback(model, version)
        return self._started(rollout, f"{model}'s previous version")

    async def _abort(self, request: web.Request) -> web.Response:
        rollout = self.controller.abort()
        return _json({"rollout": rollout.to_json()}, 202)

    async def _drain(self, request: web.Request) -> web.Response:
        name = request.match_info["worker"]
        cordon = request.match_info["action"] == "drain"
        try:
            backend = self.controller.drain(name, cordon)
        except KeyError:
            return _error(f"no worker named {name!r}", 404)
        return _json({"worker": backend.name, "state": backend.state, "cordoned": backend.cordoned})

    async def _get_routing(self, request: web.Request) -> web.Response:
        return _json(self.canary.get(self._model(request)))

    async def _put_routing(self, request: web.Request) -> web.Response:
        model = self._model(request)
        return _json(self.canary.apply(model, await self._json(request)))

    async def _canary(self, request: web.Request) -> web.Response:
        model = self._model(request)
        body = await self._json(request)
        if set(body) != {"weight"}:
            raise ValueError('body must be {"weight": N}')
        self.canary.set_weight(model, body["weight"])
        return _json(self.canary.status(model))

    async def _promote(self, request: web.Request) -> web.Response:
        model = self._model(request)
        self.canary.promote(model)
        return _json(self.canary.status(model))

    async def _abort_canary(self, request: web.Request) -> web.Response:
        model = self._model(request)
        self.canary.abort(model)
        return _json(self.canary.status(model))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024)
        app.router.add_get("/v1/admin/status", self._status)
        app.router.add_post("/v1/admin/models/{model}/rollout", self._rollout)
        app.router.add_post("/v1/admin/models/{model}/rollback", self._rollback)
        app.router.add_post("/v1/admin/rollout/abort", self._abort)
        app.router.add_post("/v1/admin/workers/{worker}/{action:drain|undrain}", self._drain)
        app.router.add_get("/v1/admin/models/{model}/routing", self._get_routing)
        app.router.add_put("/v1/admin/models/{model}/routing", self._put_routing)
        app.router.add_post("/v1/admin/models/{model}/canary", self._canary)
        app.router.add_post("/v1/admin/models/{model}/promote", self._promote)
        app.router.add_post("/v1/admin/models/{model}/abort", self._abort_canary)
        app.router.add_post("/v1/admin/models/{model}/state/reset", self._reset_state)
        return app

    async def start(self) -> None:
        if self.config.port < 0:
            return
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config.host, self.config.port, reuse_port=False,
                           ssl_context=self.tls.ssl_context() if self.tls is not None else None)
        try:
            await site.start()
        except OSError as exc:
            raise BindError(f"cannot listen for the admin API on {self.config.host}:{self.config.port} "
                            f"({exc.strerror}); choose another with --admin-port or admin.port") from exc
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        log.info("admin API on %s (%s)", self.url, "token required" if self._token else "loopback, no token")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
