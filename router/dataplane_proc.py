"""One data-plane process (``python -m router dataplane``), started by the control plane (router/procs.py).

It gets its config and the state it routes by over the control socket, binds
the gRPC port with SO_REUSEPORT beside its siblings, accepts REST connections
from the control plane's socket (its share: frontends/balanced.py), and serves:
frontends, admission, data plane, batcher, and its own connections to every
worker.  It acknowledges every revision, reports its answers and its calls
in flight, holds unversioned requests of a model while a switch is in its
first step, and drains and exits on SIGTERM or when the control plane goes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from prometheus_client import CollectorRegistry

from router import log as rlog
from router import reqlog
from router.admission import SharedAdmission
from router.batcher import Batcher
from router.config import Config, from_dict, override
from router.dataplane import DataPlane
from router.dispatch import Dispatcher
from router.frontends.balanced import ConnectionShares
from router.frontends.grpc_server import GrpcFrontend
from router.frontends.http_server import RestFrontend
from router.frontends.shutdown import drain_and_stop
from router.metrics import Metrics
from router.pool import Backend, Pool
from router.procs import HOLD_MAX_S, REPORT_S, SHARES_FILE, _receive, _send, apply_snapshot, freeze_heap, line
from router.registry import Registry
from router.tls import ClientTls, ServerTls
from router.transport import transport_for
from shared.errors import ResourceExhausted, Unavailable, from_code

log = logging.getLogger("router.dataplane")

# Tests of the switch's two steps slow one process down: "INDEX:SECONDS" delays every revision it applies.
APPLY_DELAY_ENV = "TFS_ROUTER_TEST_APPLY_DELAY"


class DataPlaneProcess:
    def __init__(self, config: Config, index: int, processes: int) -> None:
        self.config = config
        self.index = index
        self.metrics = Metrics(CollectorRegistry())
        self.pool = Pool([], max_queued=config.limits.max_queued, on_inflight=self._inflight_changed)
        self.registry = Registry(config, self.pool)
        self.worker_tls = ClientTls(config.workers.tls) if config.workers.tls.enabled else None
        self.dispatcher = Dispatcher(self.pool, on_retry=self.metrics.retried)
        self.batcher = Batcher(self.pool, self.dispatcher, self.metrics)
        self.dataplane = DataPlane(self.registry, self.dispatcher, batcher=self.batcher, on_answer=self._answered)
        self.request_logs = reqlog.attach(self.dataplane, self.metrics, config.models)
        def label(model: str) -> str:
            return model if config.model(model) is not None else "_unknown"

        self.admission = SharedAdmission(
            config, processes, self._ask_admission,
            on_shed=lambda tenant, model, why: self.metrics.quota_shed(tenant, label(model), why),
            on_admit=lambda tenant, model, waited: self.metrics.admitted(tenant, label(model), waited))
        tls = {n: ServerTls(n, config.listener_tls(n), self.metrics.tls_reload_failed,
                            alpn=("http/1.1",) if n == "rest" else ())
               for n in ("grpc", "rest") if config.listener_tls(n).enabled}
        self.grpc = GrpcFrontend(config, self.dataplane, self.metrics, self.admission, tls=tls.get("grpc"))
        self.rest = RestFrontend(config, self.dataplane, self.registry, self.metrics, self.admission,
                                 tls=tls.get("rest"))
        self.grpc.reuse_port = self.rest.reuse_port = True
        self._watched = list(tls.values()) + ([self.worker_tls] if self.worker_tls is not None else [])
        self._answers: list[tuple[str, int, str, float]] = []
        self._report_soon = False
        self._writer: asyncio.StreamWriter | None = None
        self._hold_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serving = False
        self._scrapes: dict[int, asyncio.Future[bytes]] = {}
        self._next_scrape = 0
        self._admissions: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_admission = 0
        self.rest.metrics_source = self._scrape
        self.pool.version_missing = self._version_missing
        self._missing: dict[int, asyncio.Future[None]] = {}
        self._next_missing = 0
        index_s, _, delay_s = os.environ.get(APPLY_DELAY_ENV, "").partition(":")
        self._apply_delay = float(delay_s) if index_s == str(index) and delay_s else 0.0

    # -- what goes back to the control plane -------------------------------------------

    def _answered(self, model: str, version: int, code: str, seconds: float) -> None:
        # Counted by the control plane, from the reports (its canary judges them; one scrape shows them).
        self._answers.append((model, version, code, seconds))

    def _inflight_changed(self, backend: Backend) -> None:
        self.metrics.set_worker_inflight(backend.name, backend.inflight)
        if not backend.routable and not self._report_soon:  # a drain waits for this count
            self._report_soon = True
            asyncio.get_running_loop().call_soon(self._report)

    def _inflight(self) -> dict[str, int]:
        return {b.name: b.inflight for b in self.pool.backends if b.inflight}

    def _report(self) -> None:
        self._report_soon = False
        if self._writer is None or self._writer.is_closing():
            return
        answers, self._answers = self._answers, []
        self._writer.write(line({"kind": "report", "answers": answers, "inflight": self._inflight()}))

    async def _reporter(self) -> None:
        while True:
            await asyncio.sleep(REPORT_S)
            self._report()

    async def _version_missing(self, backend: Backend, model: str, version: int) -> None:
        """A worker answered NOT_FOUND for ``version``: the control plane reads the workers again and
        publishes what they hold (passive control); returns once this process applied it."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        self._next_missing += 1
        ident = self._next_missing
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._missing[ident] = waiter
        writer.write(line({"kind": "missing", "id": ident, "worker": backend.name, "model": model,
                           "version": version}))
        try:
            await asyncio.wait_for(waiter, 15.0)
        except asyncio.TimeoutError:
            self._missing.pop(ident, None)

    async def _scrape(self) -> bytes:
        """The whole router's metrics: the control plane sums every process's (router/procs.py)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return self.metrics.render()[0]
        self._next_scrape += 1
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._scrapes[self._next_scrape] = waiter
        writer.write(line({"kind": "scrape", "id": self._next_scrape}))
        try:
            return await asyncio.wait_for(waiter, 5.0)
        except asyncio.TimeoutError:
            self._scrapes.pop(self._next_scrape, None)
            log.warning("the control plane did not answer a scrape; this process's metrics only")
            return self.metrics.render()[0]

    async def _ask_admission(self, tenant: str | None, model: str, deadline: float) -> Callable[[], None]:
        """The control plane's admission for a request of a tenant or model with a quota (one for the
        whole router): the function that releases it, or the refusal raised here."""
        writer = self._writer
        if writer is None or writer.is_closing():
            raise Unavailable("the router's control plane is not reachable")
        self._next_admission += 1
        ident = self._next_admission
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._admissions[ident] = waiter
        writer.write(line({"kind": "admit", "id": ident, "tenant": tenant, "model": model, "deadline": deadline}))
        try:
            reply = await waiter
        finally:
            self._admissions.pop(ident, None)
        if reply["kind"] != "admitted":
            code = grpc.StatusCode[reply["code"]]
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise ResourceExhausted(reply["message"], float(reply.get("retry_after") or 1.0))
            raise from_code(code, reply["message"])

        def release() -> None:
            if self._writer is not None and not self._writer.is_closing():
                self._writer.write(line({"kind": "release", "id": ident}))

        return release

    # -- state -----------------------------------------------------------------------------

    def _connect(self, backend: Backend) -> None:
        backend.transport = transport_for(self.config.workers, backend.name, backend.address, self.worker_tls)

    def _disconnect(self, backend: Backend) -> None:
        old, backend.transport = backend.transport, None
        if old is not None:
            self._spawn(old.close())

    def _hold(self, models: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for m in models:
            self.registry.held.setdefault(m, asyncio.Event())
            timer = self._hold_timers.pop(m, None)
            if timer is not None:
                timer.cancel()
            self._hold_timers[m] = loop.call_later(HOLD_MAX_S, self._release, [m], True)

    def _release(self, models: list[str], expired: bool = False) -> None:
        for m in models:
            held = self.registry.held.pop(m, None)
            timer = self._hold_timers.pop(m, None)
            if timer is not None and not expired:
                timer.cancel()
            if held is not None:
                if expired:
                    log.warning("model %s: the control plane never released its switch; serving on", m)
                held.set()

    def _apply(self, message: dict[str, Any]) -> None:
        apply_snapshot(message["state"], self.pool, self.registry, self._connect, self._disconnect)
        self._release(list(message.get("release", ())))
        if self.registry.ready() and not self._serving:
            self._serving = True
            self._spawn(self.grpc.set_serving(True))

    def _set_models(self, config: Config) -> None:
        """The model list changed at run time: the parts that keep it follow (as in App.set_models)."""
        removed = {m.name for m in self.config.models} - {m.name for m in config.models}
        self.config = config
        for part in (self.registry, self.admission, self.grpc, self.rest):
            part.set_models(config)
        self.request_logs.follow(config.models)
        self.grpc.config = override(config, **{"grpc.port": self.grpc.port})
        self.rest.config = override(config, **{"rest.port": self.rest.port})
        for name in removed:
            self.pool.fail_waiters(name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- run -----------------------------------------------------------------------------------

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, grpc_port: int,
                  rest_port: int, stop: asyncio.Event) -> None:
        self._writer = writer
        first = await _receive(reader)
        if first is None or first.get("kind") != "state":
            raise RuntimeError("the control plane sent no state")
        self._apply(first)
        self.grpc.config = override(self.config, **{"grpc.port": grpc_port})
        self.rest.config = override(self.config, **{"rest.port": rest_port})
        await self.grpc.start()
        await self.rest.start()
        self.rest.accepting = True
        for t in self._watched:
            self._spawn(t.watch())
        self._spawn(self._reporter())
        freeze_heap()
        await _send(writer, {"kind": "ready", "pid": os.getpid(), "inflight": {}})
        self._spawn(self._follow(reader, writer, stop))
        await stop.wait()
        await self.stop()

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
        try:
            while True:
                message = await _receive(reader)
                if message is None:
                    log.warning("data plane %d: the control plane went away; draining", self.index)
                    break
                kind = message.get("kind")
                if self._apply_delay and kind in ("hold", "state"):
                    await asyncio.sleep(self._apply_delay)
                if kind == "models":
                    self._set_models(from_dict(message["config"]))
                elif kind == "hold":
                    self._hold(list(message["models"]))
                elif kind == "state":
                    self._apply(message)
                elif kind == "expose":
                    writer.write(line({"kind": "exposition", "id": message["id"],
                                        "text": self.metrics.render()[0].decode("utf-8")}))
                    continue
                elif kind in ("admitted", "refused"):
                    admission = self._admissions.get(message["id"])
                    if admission is not None and not admission.done():
                        admission.set_result(message)
                    continue
                elif kind == "found":
                    missing = self._missing.pop(message["id"], None)
                    if missing is not None and not missing.done():
                        missing.set_result(None)
                    continue
                elif kind == "scraped":
                    waiter = self._scrapes.pop(message["id"], None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message["text"].encode("utf-8"))
                    continue
                else:
                    continue
                writer.write(line({"kind": "ack", "rev": message["rev"], "inflight": self._inflight()}))
        except (ConnectionError, ValueError) as exc:
            log.warning("data plane %d: control channel broke (%s); draining", self.index, exc)
        finally:
            for admission in self._admissions.values():  # nobody will answer them now
                if not admission.done():
                    admission.set_result({"kind": "refused", "code": "UNAVAILABLE",
                                          "message": "the router's control plane went away"})
            stop.set()

    async def stop(self) -> None:
        await drain_and_stop(self.grpc, self.rest, self.config.shutdown_timeout_s, before_stop=self._report)
        await self.batcher.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close_transports()
        await asyncio.to_thread(self.request_logs.close)  # what is queued is written

async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != pid:
            log.warning("the control plane (pid %d) is gone; draining", pid)
            stop.set()
            return
        await asyncio.sleep(0.5)


async def serve(control: str, index: int, parent_pid: int, rest_fd: int = -1) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader, writer = await asyncio.open_unix_connection(control, limit=2**26)
    await _send(writer, {"kind": "hello", "index": index, "pid": os.getpid()})
    hello = await _receive(reader)
    if hello is None or hello.get("kind") != "config":
        return 1
    config = from_dict(hello["config"])
    rlog.setup(config.log.level, config.log.format, config.log.access_log)
    proc = DataPlaneProcess(config, index, int(hello["processes"]))
    if rest_fd >= 0:  # the control plane's REST socket, connections spread by count (frontends/balanced.py)
        shares = ConnectionShares(Path(control).parent / SHARES_FILE, int(hello["processes"]))
        proc.rest.shared_listener = (socket.socket(fileno=rest_fd), shares, index)
    watcher = loop.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
    try:
        await proc.run(reader, writer, int(hello["grpc_port"]), int(hello["rest_port"]), stop)
    finally:
        if watcher is not None:
            watcher.cancel()
        writer.close()
    return 0


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfs-router dataplane", description=__doc__)
    p.add_argument("--control", required=True, help="the control plane's Unix socket")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--rest-fd", type=int, default=-1, help="the REST socket, listening, inherited")
    args = p.parse_args(argv)
    import prometheus_client
    import uvloop

    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    started = time.monotonic()
    code = uvloop.run(serve(args.control, args.index, args.parent_pid, args.rest_fd))
    log.info("data plane %d stopped after %.0fs", args.index, time.monotonic() - started)
    raise SystemExit(code)
