"""Composition root: builds the router's parts and owns their start and stop order.

Start: metrics, pool and the control plane; the frontends and the admin
endpoint bind (not ready yet); the workers start (spawned and supervised,
or static addresses); the rollout controller loads and warms each worker as
soon as it answers; background tasks poll the base paths and health-check
the workers.  Ready when every model's default version is AVAILABLE on a
worker in rotation.

Stop (SIGTERM): report not-ready, stop accepting and drain in-flight
requests under ``shutdown_timeout_s``, stop the controller and background
tasks, close the worker channels, then stop the worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from router.admission import Admission
from router.analysis import VersionStats
from router.batcher import Batcher
from router.config import Config, ConfigError, ModelConfig, asdict_lists, from_dict
from router.control.canary import CanaryController
from router.control.passive import PassiveSync
from router.registry import Registry
from router.control.rollout import Controller
from router.control.source import VersionSource
from router.dataplane import DataPlane
from router.dispatch import Dispatcher
from router.discovery import Discovery, Resolver, parse as parse_dns, system_resolver
from router.frontends.admin import AdminFrontend, admin_token
from router.frontends.grpc_server import GrpcFrontend
from router.frontends.http_server import RestFrontend
from router.frontends.shutdown import drain_and_stop
from router.metrics import Metrics
from router.pool import DEAD, DRAINING, READY, STARTING, Backend, Pool
from router import reqlog
from router.frontends.balanced import listening_socket
from router.fleet import Fleet, identity as fleet_identity
from router.procs import HOLD_MAX_S, Hub, reserve_port, resolve_count
from router.state import (EtcdStore, FileStore, State, StateConflict, StoreUnavailable, directory as state_directory,
                          empty as empty_state, merge as merge_state)
from router.tls import ClientTls, ServerTls
from router.transport import Transport, transport_for
from workers import supervisor as sup

log = logging.getLogger("router.app")

HEALTH_FAILURES_BEFORE_DEAD = 3


class App:
    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None,
                 resolver: Resolver | None = None, config_path: str | None = None,
                 ignore_state: bool = False) -> None:
        self.config = config
        self.metrics = Metrics(registry or CollectorRegistry())
        w = config.workers
        self._socket_dir: Path | None = None
        if w.mode == "spawn":
            if w.socket_dir:
                self._socket_dir = Path(w.socket_dir)
                self._socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                # The workers' sockets are plaintext: only this user may reach them.
                if self._socket_dir.stat().st_mode & 0o077:
                    log.warning("workers.socket_dir %s was open to other users; now 0700", self._socket_dir)
                    self._socket_dir.chmod(0o700)
                self._own_socket_dir = False
            else:
                self._socket_dir = Path(tempfile.mkdtemp(prefix="tfs-router-"))
                self._own_socket_dir = True
            backends = [Backend(f"w{i}", f"unix:{self._socket_dir / f'w{i}.sock'}", w.max_inflight, index=i)
                        for i in range(w.count)]
        else:  # dns: addresses join as they resolve (self.discovery)
            backends = [Backend(addr, addr, w.max_inflight, index=i) for i, addr in enumerate(w.addresses)
                        if parse_dns(addr) is None]
        self._by_index = {b.index: b for b in backends}
        self.pool = Pool(backends, max_queued=config.limits.max_queued,
                         on_inflight=lambda b: self.metrics.set_worker_inflight(b.name, b.inflight))
        self.registry = Registry(config, self.pool)
        self.source = VersionSource(config.models, ready_marker=config.source.ready_marker,
                                    stable_polls=config.source.stable_polls)
        self.controller = Controller(config, self.pool, self.registry, self.source, self.metrics, fleet=self,
                                     on_change=self._publish_states)
        self.passive = PassiveSync(config, self.pool, self.registry, on_change=self._publish_states) \
            if w.control == "passive" else None
        self.controller.passive = self.passive is not None
        if self.passive is not None:
            self.pool.version_missing = self.passive.version_missing
        self.discovery = Discovery(w.addresses, resolver=resolver or system_resolver, refresh_s=w.dns_refresh_s,
                                   drop_after=w.dns_drop_after, add=self._add_worker, drop=self._drop_worker) \
            if w.mode == "static" and any(parse_dns(a) for a in w.addresses) else None
        # TLS (router/tls.py): each listener's certificate and the links to workers, files watched.
        self._tls_watched: list[ServerTls | ClientTls] = []
        self._tls_failing: set[str] = set()  # workers whose TLS handshake fails now
        grpc_tls, rest_tls, admin_tls = (self._server_tls(n, alpn) for n, alpn in
                                         (("grpc", ()), ("rest", ("http/1.1",)), ("admin", ("http/1.1",))))
        if config.quotas.tenant_from == "client_cert" and grpc_tls is not None and not grpc_tls.material.mutual:
            raise ConfigError("quotas.tenant_from: client_cert needs client certificates on gRPC "
                              "(the ssl_config_file's client_verify: true)")
        self.worker_tls = ClientTls(w.tls, self.metrics.tls_reload_failed) if w.tls.enabled else None
        if self.worker_tls is not None:
            self._tls_watched.append(self.worker_tls)
        self.stats = VersionStats()
        self.registry.on_route = self.metrics.routing_fallback
        self.canary = CanaryController(config, self.registry, self.controller, self.stats, self.metrics)
        self.dispatcher = Dispatcher(self.pool, on_retry=self.metrics.retried)
        self.batcher = Batcher(self.pool, self.dispatcher, self.metrics)
        self.dataplane = DataPlane(self.registry, self.dispatcher, batcher=self.batcher,
                                   on_answer=self._answered)
        def label(model: str) -> str:
            return model if self.config.model(model) is not None else "_unknown"

        self.admission = Admission(
            config, on_shed=lambda tenant, model, why: self.metrics.quota_shed(tenant, label(model), why),
            on_admit=lambda tenant, model, waited: self.metrics.admitted(tenant, label(model), waited))
        self.grpc = GrpcFrontend(config, self.dataplane, self.metrics, self.admission, tls=grpc_tls)
        self.rest = RestFrontend(config, self.dataplane, self.registry, self.metrics, self.admission, tls=rest_tls)
        self.metrics.track_control(self._admission_families)
        self.admin = AdminFrontend(config.admin, self.controller, self.canary, token=admin_token(), tls=admin_tls)
        self.supervisor: sup.Supervisor | None = None
        self._specs: dict[int, sup.WorkerSpec] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._health_failures: dict[str, int] = {}
        self._ready = asyncio.Event()
        self._stopping = False
        self._models_loader: tuple[Callable[[], tuple[ModelConfig, ...]], float] | None = None
        # dataplane.processes > 1: the frontends run in data-plane processes (router/procs.py)
        self.processes = resolve_count(config.dataplane.processes)
        # Request logs (router/reqlog.py): written by whichever process answers (each data plane its own)
        self.request_logs = reqlog.attach(self.dataplane, self.metrics, config.models) if self.processes == 1 \
            else None
        self.hub: Hub | None = None
        self._reserved: list[Any] = []
        self.registry.on_switch = self._state_changed
        # Operator decisions kept across restarts (router/state.py): read now, applied at start.
        st = config.state
        self.store: FileStore | EtcdStore | None = (
            FileStore(state_directory(st.dir, config_path)) if st.backend == "file"
            else EtcdStore(st.endpoints, st.prefix, st.tls, st.username, st.password_file) if st.backend == "etcd"
            else None)
        self._runtime: State = empty_state()
        self._ignore_state = ignore_state
        if isinstance(self.store, FileStore) and not ignore_state:
            self._runtime = self.store.load()
        self._persist_now = asyncio.Event()
        # etcd: the replicas are a fleet, and only its leader judges progressive delivery (router/fleet.py)
        self.fleet: Fleet | None = None
        if isinstance(self.store, EtcdStore):
            store = self.store
            fleet = self.fleet = Fleet(store, fleet_identity(), self._published_windows)
            self.canary.judge = lambda: fleet.leading
            self.canary.windows = lambda model, p: fleet.merged(model, p.step_started_at, self.stats.take(model))
            self.rest.readiness_detail = lambda: {"state_store": "stale" if store.stale else "ok"}
        self.canary.on_judged = lambda model: self._persist_now.set()
        # Passive routers on etcd switch their default version together (the leader decides, see
        # _fleet_switch): the fleet's default per model, as stored, and the switches under way here.
        self._fleet_defaults: dict[str, int] = {}
        self._fleet_switching: set[str] = set()
        self._fleet_holds: dict[str, asyncio.TimerHandle] = {}
        if self.fleet is not None and self.passive is not None:
            self.passive.decide = self._decide_default
        self.metrics.track_control(self._state_families)
        self._config_routing = {m.name: self.canary.get(m.name) for m in config.models}
        self.admin.after_command = self._after_command
        self.admin.reset_state = self.reset_state
        self.admin.extra_status = self._extra_status

    def _server_tls(self, listener: str, alpn: tuple[str, ...]) -> ServerTls | None:
        cfg = self.config.listener_tls(listener)
        if not cfg.enabled or (listener == "admin" and self.config.admin.port < 0):
            return None
        tls = ServerTls(listener, cfg, self.metrics.tls_reload_failed, alpn=alpn)
        self._tls_watched.append(tls)
        return tls

    def _worker_tls_failed(self, backend: Backend, details: str) -> None:
        self.metrics.worker_tls_error(backend.name)
        if backend.name not in self._tls_failing:
            self._tls_failing.add(backend.name)
            log.error("worker %s: TLS handshake failed (%s); out of rotation until its certificate verifies "
                      "(workers.tls)", backend.name, details)

    def _admission_families(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        inflight = GaugeMetricFamily("tfs_router_tenant_inflight", "Admitted requests of a tenant not yet answered.",
                                     labels=("tenant",))
        for tenant, n in sorted(self.admission.inflight().items()):
            inflight.add_metric((tenant,), n)
        router = GaugeMetricFamily("tfs_router_admission", "The router-wide admission gate: in flight and waiting.",
                                   labels=("state",))
        router.add_metric(("inflight",), self.admission.router.inflight)
        router.add_metric(("waiting",), self.admission.router.queued)
        refused = CounterMetricFamily("tfs_router_rest_connections_refused",
                                      "REST connections closed at once: past rest.max_connections.")
        refused.add_metric((), self.rest.refused_connections)
        return [inflight, router, refused]

    def _answered(self, model: str, version: int, code: str, seconds: float) -> None:
        self.metrics.version_answered(model, version, code, seconds)
        self.stats.record(model, version, code, seconds)

    @property
    def grpc_port(self) -> int:
        return self.grpc.port

    @property
    def rest_port(self) -> int:
        return self.rest.port

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- operator decisions kept across restarts (router/state.py) ------------------------

    def _runtime_values(self) -> dict[str, Any]:
        """What was decided at run time and is not in the config, as plain values."""
        models: dict[str, Any] = {}
        for m in self.config.models:
            entries: dict[str, Any] = {}
            routing = self.canary.get(m.name)
            if routing != self._config_routing.get(m.name, {}):
                entries["routing"] = routing
            # Where a progression is: the one router's own (file); with etcd the fleet's leader writes it
            # (with its outcome, for the others to follow) and the others keep what it wrote.
            if self.fleet is None:
                progressive = self.canary.resumable(m.name)
            elif self.fleet.leading:
                progressive = self.canary.resumable(m.name, ended=True)
            else:
                stored = self._runtime["models"].get(m.name, {}).get("progressive")
                progressive = stored.value if stored is not None else None
            if progressive is not None:
                entries["progressive"] = progressive
            if m.name in self._fleet_defaults:  # passive fleet: written by its leader only
                entries["default"] = self._fleet_defaults[m.name]
            pinned = self.source.pinned(m.name)
            if pinned is not None:
                entries["pinned"] = list(pinned)
            failed = {v: [[list(f) for f in fp] if fp is not None else None, reason]
                      for v, (fp, reason) in self.source.failed_marks(m.name).items()}
            if failed:
                entries["failed"] = failed
            if entries:
                models[m.name] = entries
        return {"models": models, "workers": {b.name: True for b in self.pool.backends if b.cordoned}}

    async def persist(self, by: str = "router") -> None:
        """Write the runtime state if it changed (entries that did not keep who set them and when).
        With etcd: StateConflict when another replica changed an entry first, StoreUnavailable."""
        if self.store is None:
            return
        new = merge_state(self._runtime, self._runtime_values(), by, time.time())
        if new == self._runtime:
            return
        if isinstance(self.store, EtcdStore):
            await self.store.save(new)
        else:
            try:
                self.store.save(new)
            except OSError as exc:
                log.error("runtime state not saved to %s: %s", self.store.path, exc)
                return
        self._runtime = new

    # -- a fleet's default version (passive routers on etcd) ------------------------------------

    def _decide_default(self, model: str, current: int | None, proposed: int | None, served: set[int]) -> int | None:
        """PassiveSync.decide in a fleet: the default the fleet's leader stored, while this router's
        workers serve it; the leader moves the fleet when its own choice differs (_fleet_switch)."""
        assert self.fleet is not None
        stored = self._fleet_defaults.get(model)
        if self.fleet.leading and proposed is not None and proposed != stored:
            if stored is None or stored not in served:  # nothing to hold: the first default, or the old is gone
                self._fleet_defaults[model] = proposed
                self._spawn(self._write_fleet_default(model), f"fleet-default-{model}")
                return proposed
            if model not in self._fleet_switching:
                self._spawn(self._fleet_switch(model, proposed), f"fleet-switch-{model}")
        if stored is not None and stored in served:
            return stored
        return current if current in served else proposed

    async def _fleet_switch(self, model: str, version: int) -> None:
        """Move every replica's unversioned requests of ``model`` to ``version`` at one store revision:
        every replica holds them (and sees the version served) first, then the leader writes the default,
        and each switches and lets them go as it applies that write (no client sees the old version
        after the new one, whichever replica it asks)."""
        assert self.fleet is not None
        self._fleet_switching.add(model)
        try:
            switch_id = await self.fleet.begin_switch(model, version)
            holding, alive = await self.fleet.wait_acks(model, switch_id)
            if not self.fleet.leading:
                return
            if alive - holding:
                log.warning("model %s: replicas %s did not hold in time; switching the fleet anyway", model,
                            sorted(alive - holding))
            self._fleet_defaults[model] = version
            await self.persist()
            self._log_fleet_default(model)
            if self.passive is not None:
                self.passive.settle()
            await self._release_fleet_hold(model)
        except (StoreUnavailable, StateConflict) as exc:
            log.warning("model %s: the fleet's switch to version %d did not happen: %s", model, version, exc)
            if self._fleet_defaults.get(model) == version:  # not written: the stored default stands
                del self._fleet_defaults[model]
        finally:
            self._fleet_switching.discard(model)
            try:
                await self.fleet.end_switch(model)
            except StoreUnavailable:
                pass

    async def _write_fleet_default(self, model: str) -> None:
        try:
            await self.persist()
        except (StoreUnavailable, StateConflict) as exc:
            log.warning("model %s: the fleet's default not written yet (%s); written with the next change", model,
                        exc)
            return
        self._log_fleet_default(model)

    def _log_fleet_default(self, model: str) -> None:
        revision = self.store.revisions.get(f"models/{model}") if isinstance(self.store, EtcdStore) else None
        log.info("model %s: the fleet's default is version %d (store revision %s)", model,
                 self._fleet_defaults[model], revision)

    def _fleet_switch_begun(self, model: str, version: int, switch_id: str) -> None:
        self._spawn(self._hold_for_fleet(model, version, switch_id), f"fleet-hold-{model}")

    async def _hold_for_fleet(self, model: str, version: int, switch_id: str) -> None:
        """The leader moves the fleet to ``version``: hold new unversioned requests of ``model`` (until
        this router applies the stored default, or for HOLD_MAX_S), see the version served, say so."""
        assert self.fleet is not None
        if self.config.model(model) is None:
            return
        if self.hub is not None:
            await self.hub.hold([model])
        else:
            self.registry.held.setdefault(model, asyncio.Event())
        old = self._fleet_holds.pop(model, None)
        if old is not None:
            old.cancel()
        self._fleet_holds[model] = asyncio.get_running_loop().call_later(
            HOLD_MAX_S, lambda: self._spawn(self._release_fleet_hold(model), f"fleet-release-{model}"))
        end = time.monotonic() + HOLD_MAX_S / 2
        while version not in self.pool.available_versions(model) and time.monotonic() < end:
            if self.passive is not None:
                self.passive.wake()
            await asyncio.sleep(0.02)
        try:
            await self.fleet.ack(model, switch_id)
        except StoreUnavailable:
            pass

    async def _release_fleet_hold(self, model: str) -> None:
        timer = self._fleet_holds.pop(model, None)
        if timer is None:
            return
        timer.cancel()
        if self.hub is not None:
            await self.hub.release([model])
        held = self.registry.held.pop(model, None)
        if held is not None:
            held.set()

    def _published_windows(self) -> dict[str, dict[str, Any]]:
        """This replica's windows of every running progression, for the fleet's leader (router/fleet.py)."""
        assert self.fleet is not None
        out = {}
        for model, progress in self.canary.progress.items():
            if progress.state == "running":
                out[model] = {"step_started_at": progress.step_started_at,
                              "versions": self.fleet.summary(self.stats.peek(model))}
        return out

    async def _persist_forever(self) -> None:
        while True:
            # what the router itself changes (failed marks, canary steps): each second, or at once after
            # a canary verdict
            try:
                await asyncio.wait_for(self._persist_now.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._persist_now.clear()
            try:
                await self.persist()
            except StateConflict:
                pass  # the watcher brings the other replica's change
            except StoreUnavailable:
                pass  # kept in memory; written once the store is back

    def _apply_state(self, state: State) -> None:
        """Make this router's runtime decisions what ``state`` says (another replica changed them, or a
        write of ours was refused and is undone): over the config, entry by entry."""
        for m in self.config.models:
            entries = state["models"].get(m.name, {})
            routing = entries["routing"].value if "routing" in entries else self._config_routing.get(m.name, {})
            follow = self.fleet is not None and not self.fleet.leading and "progressive" in entries
            if routing != self.canary.get(m.name):
                progress = self.canary.progress.get(m.name)
                # the leader moved its progression on (a step's weights): the same progression, followed
                same = (follow and progress is not None and progress.state == "running"
                        and routing.get("progressive") == self.canary.get(m.name).get("progressive"))
                try:
                    self.canary.apply(m.name, routing, check_versions=False, keep_progress=same)
                except ValueError as exc:
                    log.error("model %s: the stored routing block is not used: %s", m.name, exc)
            if follow:
                self.canary.follow(m.name, entries["progressive"].value)
                if routing != self.canary.get(m.name):  # a progression begun here starts at step 0's weights
                    try:
                        self.canary.apply(m.name, routing, check_versions=False, keep_progress=True)
                    except ValueError:
                        pass  # logged above
            if "default" in entries and entries["default"].value != self._fleet_defaults.get(m.name):
                self._fleet_defaults[m.name] = int(entries["default"].value)
                self._log_fleet_default(m.name)
                if self.passive is not None:
                    self.passive.settle()
                self._spawn(self._release_fleet_hold(m.name), f"fleet-release-{m.name}")
            pinned = tuple(entries["pinned"].value) if "pinned" in entries else None
            if pinned != self.source.pinned(m.name):
                self.source.pin(m.name, pinned)
            failed = {int(v): e.value for v, e in entries.get("failed", {}).items()}
            for version in set(self.source.failed(m.name)) - set(failed):
                self.source.retry(m.name, version)
            for version, (fp, reason) in failed.items():
                if version not in self.source.failed(m.name):
                    self.source.restore_failed(m.name, version,
                                               tuple(tuple(f) for f in fp) if fp is not None else None, reason)
        for b in self.pool.backends:
            drained = b.name in state["workers"]
            if drained != b.cordoned:
                self.controller.drain(b.name, drained)
        self._runtime = state
        self._state_changed()
        self.controller.wake()

    def _state_families(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        stale = GaugeMetricFamily("tfs_router_state_stale", "1 while the state store (state.backend) cannot be "
                                  "reached: the router serves on with the last state it had.")
        stale.add_metric((), 1.0 if isinstance(self.store, EtcdStore) and self.store.stale else 0.0)
        return [stale]

    def _restore(self) -> None:
        """Apply the runtime state read at start, over the config."""
        names = {m.name for m in self.config.models}
        for model, entries in self._runtime["models"].items():
            if model not in names:
                continue
            if "routing" in entries:
                try:
                    self.canary.apply(model, entries["routing"].value, check_versions=False)
                except ValueError as exc:
                    log.error("model %s: the saved routing block is not used: %s", model, exc)
            if "progressive" in entries:
                self.canary.resume(model, entries["progressive"].value)
            if "pinned" in entries:
                self.source.pin(model, entries["pinned"].value)
            if "default" in entries:
                self._fleet_defaults[model] = int(entries["default"].value)
            for version, e in entries.get("failed", {}).items():
                fp, reason = e.value
                self.source.restore_failed(model, int(version),
                                           tuple(tuple(f) for f in fp) if fp is not None else None, reason)
            log.info("model %s: runtime state restored (%s)", model, ", ".join(sorted(entries)))
        for b in self.pool.backends:
            if b.name in self._runtime["workers"]:
                b.cordoned = True
                log.info("worker %s: drained by an operator before the restart; stays drained", b.name)

    def reset_state(self, model: str) -> dict[str, Any]:
        """``tfs-router state reset MODEL``: back to the config (routing, the policy, failed versions retried)."""
        self.registry.model(model)
        self.canary.apply(model, self._config_routing.get(model, {}), check_versions=False)
        self.source.pin(model, None)
        for version in list(self.source.failed(model)):
            self.source.retry(model, version)
        self.controller.wake()
        return {"reset": model}

    async def _after_command(self, actor: str) -> None:
        try:
            await self.persist(actor)
        except (StateConflict, StoreUnavailable):
            self._apply_state(self._runtime)  # the command is undone here: it was not kept
            raise
        if self.hub is not None:
            await self.hub.synced()

    def _extra_status(self) -> dict[str, Any]:
        out: dict[str, Any] = self.hub.status() if self.hub is not None else {}
        if self.store is not None:
            out["state"] = {
                "file": str(self.store.path),
                "stale": isinstance(self.store, EtcdStore) and self.store.stale,
                "models": {m: {k: ({str(v): {"by": x.by, "at": x.at} for v, x in e.items()} if k == "failed"
                                   else {"by": e.by, "at": e.at}) for k, e in entries.items()}
                           for m, entries in self._runtime["models"].items()},
                "workers": {n: {"by": e.by, "at": e.at} for n, e in self._runtime["workers"].items()},
            }
            if self.fleet is not None:
                out["state"]["fleet"] = self.fleet.status()
        return out

    def _state_changed(self) -> None:
        if self.hub is not None:
            self.hub.publish()

    def record_answer(self, model: str, version: int, code: str, seconds: float) -> None:
        """An answer a data-plane process gave (router/procs.py)."""
        self._answered(model, version, code, seconds)

    def _publish_states(self) -> None:
        self._state_changed()
        for b in self.pool.backends:
            self.metrics.set_worker_state(b.name, b.state)
        if self.registry.ready() and not self._stopping:
            if not self._ready.is_set():
                self._ready.set()
                log.info("ready: %s", {m.name: sorted(self.pool.available_versions(m.name))
                                       for m in self.config.models})
                self._spawn(self.grpc.set_serving(True), "grpc-serving")

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.source.poll)
        if isinstance(self.store, EtcdStore) and not self._ignore_state:
            try:
                self._runtime = await self.store.load()
            except StoreUnavailable as exc:
                log.warning("state store unreachable at start (%s): starting from the config; its state is "
                            "applied once it answers", exc)
        self._restore()
        for m in self.config.models:
            if not self.source.on_disk(m.name):
                log.warning("model %s: no version directories under %s yet", m.name, m.base_path)
        if self.processes > 1:
            await self._start_dataplanes()
        else:
            await self.grpc.start()
            await self.rest.start()
            self.rest.accepting = True
        await self.admin.start()
        self._publish_states()
        w = self.config.workers
        if w.mode == "spawn":
            self._specs = {spec.index: spec for spec in self._worker_specs(w.count)}
            for spec in self._specs.values():
                log.info("worker w%d: cpus %s", spec.index, list(spec.cpus) or "any")
            self.supervisor = sup.Supervisor(
                list(self._specs.values()), self._on_worker_event, backoff_initial=w.restart_backoff_s,
                backoff_max=w.restart_backoff_max_s, startup_timeout=w.startup_timeout_s,
            )
            await self.supervisor.start()
        else:
            for b in self.pool.backends:
                self._connect(b)
            if self.discovery is not None:
                await self.discovery.refresh()  # the first workers before anything else runs
                self._spawn(self._discover_forever(), "dns-discovery")
        if self.passive is not None:
            self._spawn(self.passive.run(), "passive-sync")
        else:
            self._spawn(self.controller.run(), "rollout-controller")
        if self._models_loader is not None:
            self._spawn(self._reload_models_forever(*self._models_loader), "model-config-poll")
        self._spawn(self.canary.run(), "canary-controller")
        self._spawn(self._poll_forever(self.config.poll_interval_s), "poll")
        self._spawn(self._health_loop(), "health")
        if self.store is not None:
            self._spawn(self._persist_forever(), "state")
        if isinstance(self.store, EtcdStore):
            self._spawn(self.store.watch(self._apply_state), "state-watch")
        if self.fleet is not None:
            self._spawn(self.fleet.run(), "fleet")
            if self.passive is not None:
                self._spawn(self.fleet.watch_switches(self._fleet_switch_begun), "fleet-switches")
        for tls in self._tls_watched:
            self._spawn(tls.watch(), f"tls-{tls.name}")

    async def _start_dataplanes(self) -> None:
        """The ports held (bound with SO_REUSEPORT, not listening), the data-plane processes started."""
        g, r = self.config.grpc, self.config.rest
        for name, host, port, frontend in (("gRPC", g.host, g.port, self.grpc), ("REST", r.host, r.port, self.rest)):
            try:
                if frontend is self.grpc:
                    sock = reserve_port(host, port)
                else:  # REST: one listening socket, accepted from by every data plane, evenly
                    sock = listening_socket(host, port, min(r.max_connections, 4096))
            except OSError as exc:
                from shared.errors import BindError

                flag = "--grpc-port or grpc.port" if frontend is self.grpc else "--rest-port or rest.port"
                raise BindError(f"cannot listen for {name} on {host}:{port} ({exc.strerror}); "
                                f"choose another with {flag}") from exc
            self._reserved.append(sock)
            frontend.port = sock.getsockname()[1]
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="tfs-router-"))
            self._own_socket_dir = True
        self.hub = Hub(self, self.processes, self._socket_dir, (self.grpc.port, self.rest.port), self._reserved[1])
        self.pool.remote_idle = self.hub.wait_idle
        await self.hub.start()
        log.info("data plane: %d processes on gRPC :%d and REST :%d", self.processes, self.grpc.port,
                 self.rest.port)

    async def wait_dataplanes(self) -> None:
        if self.hub is not None:
            await self.hub.wait_ready()

    def _worker_specs(self, count: int) -> list[sup.WorkerSpec]:
        w = self.config.workers
        assert self._socket_dir is not None
        return sup.worker_specs(
            count, self._socket_dir, numa=w.numa, sysfs_root=w.sysfs_root,
            cpus_per_worker=w.cpus_per_worker, intra_op_threads=w.intra_op_threads,
            inter_op_threads=w.inter_op_threads, predict_threads=w.predict_threads,
            allocator=w.allocator, frames=w.transport != "grpc",
            extra_args=("--parent-pid", str(os.getpid()), "--nice", str(w.nice)),
        )

    async def _poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.source.poll)
            except Exception:  # the poller must survive anything a filesystem does
                log.exception("version scan failed")
            self.controller.wake()

    # -- the fleet: surge workers (rollout.Fleet) ------------------------------

    @property
    def can_surge(self) -> bool:
        return self.supervisor is not None and not self._stopping

    async def add_surge(self) -> Backend:
        """One more spawned worker, placed as if the pool had one more member."""
        assert self.supervisor is not None
        index = max(self._by_index) + 1
        spec = self._worker_specs(index + 1)[index]
        backend = Backend(f"w{index}", spec.address, self.config.workers.max_inflight, index=index, surge=True)
        self._by_index[index] = backend
        self._specs[index] = spec
        self.pool.add(backend)
        self._publish_states()
        log.info("surge worker %s: cpus %s", backend.name, list(spec.cpus) or "any")
        await self.supervisor.add(spec)
        return backend

    async def retire(self, backend: Backend) -> None:
        """Stop a surge worker for good and forget it (it leaves the pool last, once stopped)."""
        assert self.supervisor is not None
        self._by_index.pop(backend.index, None)  # its "exited" event is no death to react to
        self._specs.pop(backend.index, None)
        await self.supervisor.remove(backend.index, timeout=self.config.shutdown_timeout_s)
        if backend.transport is not None:
            await backend.transport.close()
            backend.transport = None
        self.pool.remove(backend)
        self.metrics.remove_worker(backend.name)
        self._publish_states()

    # -- workers found by DNS (router/discovery.py) -------------------------------

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.workers.dns_refresh_s)
            try:
                await self.discovery.refresh()  # type: ignore[union-attr]
            except Exception:  # discovery must outlive a resolver's surprises
                log.exception("worker discovery failed")

    def _add_worker(self, address: str) -> None:
        if self._stopping:
            return
        index = max(self._by_index, default=-1) + 1
        backend = Backend(address, address, self.config.workers.max_inflight, index=index)
        self._by_index[index] = backend
        self.pool.add(backend)
        self._connect(backend)  # joins the rotation once it holds (active) or reports (passive) versions

    def _drop_worker(self, address: str) -> None:
        backend = next((b for b in self.pool.backends if b.address == address), None)
        if backend is not None:
            self._spawn(self._drain_and_drop(backend), f"drop-{address}")

    async def _drain_and_drop(self, backend: Backend) -> None:
        """Out of rotation, let its in-flight requests finish, then forget it."""
        self.controller.worker_lost(backend, "left DNS")
        self.pool.set_state(backend, DRAINING)
        self._publish_states()
        await self.pool.wait_idle(backend, self.config.rollout.drain_timeout_s)
        self._by_index.pop(backend.index, None)
        if backend.transport is not None:
            await backend.transport.close()
            backend.transport = None
        self.pool.remove(backend)
        self.metrics.remove_worker(backend.name)
        self._health_failures.pop(backend.name, None)
        self._publish_states()
        self._wake_control()
        log.info("worker %s dropped", backend.name)

    # -- models added and removed at run time ----------------------------------------

    def watch_models(self, loader: Callable[[], tuple[ModelConfig, ...]], interval_s: float) -> None:
        """Re-read the model list with ``loader`` every ``interval_s`` (TF Serving's
        --model_config_file_poll_wait_seconds); call before ``start``."""
        self._models_loader = (loader, interval_s)

    async def _reload_models_forever(self, loader: Callable[[], tuple[ModelConfig, ...]], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                models = await asyncio.to_thread(loader)
                if self.set_models(models):
                    await asyncio.to_thread(self.source.poll)  # new base paths now, not a poll later
                    self._wake_control()
            except ConfigError as exc:  # a half-written or broken file: keep serving what is configured
                log.error("model config not reloaded: %s", exc)
            except Exception:
                log.exception("model config reload failed")

    def set_models(self, models: tuple[ModelConfig, ...]) -> bool:
        """Serve exactly ``models`` from now on: new ones are loaded (staged, as any new
        version), removed ones answer NOT_FOUND at once and are unloaded.  Returns
        whether anything changed; ConfigError (nothing changed) when the list is invalid."""
        if tuple(models) == self.config.models:
            return False
        data = asdict_lists(self.config)
        data["models"] = [asdict_lists(m) for m in models]
        config = from_dict(data)
        old = {m.name: m for m in self.config.models}
        new = {m.name: m for m in config.models}
        added = sorted(new.keys() - old.keys())
        removed = sorted(old.keys() - new.keys())
        changed = sorted(n for n in new.keys() & old.keys() if new[n] != old[n])
        self.config = config
        self.source.set_models(config.models)
        for part in (self.registry, self.controller, self.canary, self.admission, self.grpc, self.rest):
            part.set_models(config)
        if self.passive is not None:
            self.passive.config = config
        if self.request_logs is not None:
            self.request_logs.follow(config.models)
        for name in removed:
            self.pool.fail_waiters(name)
        log.info("models reconfigured: added %s, removed %s, changed %s", added or "none", removed or "none",
                 changed or "none")
        self._publish_states()
        self._wake_control()
        return True

    # -- worker events ---------------------------------------------------------

    def _transport(self, backend: Backend) -> Transport:
        """How the router reaches this worker (``router.transport.transport_for``)."""
        return transport_for(self.config.workers, backend.name, backend.address, self.worker_tls,
                             lambda details: self._worker_tls_failed(backend, details))

    def _connect(self, backend: Backend, pid: int | None = None) -> None:
        old = backend.transport
        if old is not None:
            self._spawn(old.close(), f"close-{backend.name}")
        backend.generation += 1
        backend.transport = self._transport(backend)
        backend.versions = {}
        self.pool.set_state(backend, STARTING)
        backend.warm = {}
        backend.pid = pid
        self._health_failures[backend.name] = 0
        self._publish_states()
        self._wake_control()

    def _wake_control(self) -> None:
        if self.passive is not None:
            self.passive.wake()
        else:
            self.controller.wake()

    async def _on_worker_event(self, index: int, event: str, info: dict[str, Any]) -> None:
        backend = self._by_index.get(index)
        if backend is None:
            return  # a retired surge worker
        if event == "started":
            log.info("worker %s started (pid %s)", backend.name, info.get("pid"))
            self._connect(backend, info.get("pid"))
        elif event == "exited":
            log.warning("worker %s exited (pid %s, code %s)", backend.name, info.get("pid"), info.get("returncode"))
            self._mark_dead(backend, f"exited ({info.get('returncode')})")
            if not self._stopping:
                self.metrics.worker_restarted(backend.name)

    def _mark_dead(self, backend: Backend, why: str) -> None:
        if not self._stopping:
            self.controller.worker_lost(backend, why)
        backend.versions = {}
        backend.warm = {}
        backend.pid = None
        backend.generation += 1
        self.pool.set_state(backend, DEAD)
        self._publish_states()

    async def _health_loop(self) -> None:
        interval = self.config.workers.health_interval_s
        while True:
            await asyncio.sleep(interval)
            for b in list(self.pool.backends):
                if b.transport is None or self._stopping:
                    continue
                healthy = await b.transport.healthy(timeout=max(0.5, interval))
                if healthy:
                    self._health_failures[b.name] = 0
                    if b.name in self._tls_failing:
                        self._tls_failing.discard(b.name)
                        log.info("worker %s: TLS handshake succeeds again", b.name)
                    if b.state == DEAD and self.config.workers.mode == "static":
                        log.info("worker %s answers again; re-syncing", b.name)
                        self._connect(b)
                    continue
                self._health_failures[b.name] = self._health_failures.get(b.name, 0) + 1
                if b.state == READY and self._health_failures[b.name] >= HEALTH_FAILURES_BEFORE_DEAD:
                    log.warning("worker %s failed %d health checks; taking it out of rotation",
                                b.name, self._health_failures[b.name])
                    self._mark_dead(b, f"failed {self._health_failures[b.name]} health checks")
            self._publish_states()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # -- stop ----------------------------------------------------------------

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.shutdown_timeout_s
        log.info("shutting down: draining for up to %.1fs", grace)
        self.rest.accepting = False
        if self.hub is not None:  # each data plane drains its own calls
            await self.hub.stop(grace)
        await drain_and_stop(self.grpc, self.rest, grace)
        self.canary.stop()
        try:  # what changed since the last periodic write (a canary step in the last second) is kept too
            await self.persist()
        except (StateConflict, StoreUnavailable) as exc:
            log.warning("runtime state not written at shutdown: %s", exc)
        if self.fleet is not None:  # another replica leads at once, not after the lease's time
            await self.fleet.close()
        await self.controller.stop()
        await self.admin.stop()
        await self.batcher.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close_transports()
        if self.request_logs is not None:
            await asyncio.to_thread(self.request_logs.close)  # what is queued is written
        if self.supervisor is not None:
            await self.supervisor.stop(timeout=grace)
        for sock in self._reserved:
            sock.close()
        if self._socket_dir is not None and self._own_socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        log.info("stopped")


def describe(app: App, host: str) -> str:
    """Where to point clients, printed by ``tfs-router serve``."""
    models = ", ".join(m.name for m in app.config.models)
    first = app.config.models[0].name
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    http = "https" if app.rest.tls is not None else "http"
    lines = [
        f"tfs-router serving {models}",
        f"  gRPC (TF Serving API): {shown}:{app.grpc_port}",
        f"  REST (TF Serving API): {http}://{shown}:{app.rest_port}/v1/models/{first}",
        f"  metrics:               {http}://{shown}:{app.rest_port}/monitoring/prometheus/metrics",
    ]
    if app.admin.port:
        lines.append(f"  admin:                 {app.admin.url}/v1/admin/status  (tfs-router status)")
    secured = [f"{name}{' (client certificates required)' if tls.material.mutual else ''}"
               for name, tls in (("gRPC", app.grpc.tls), ("REST", app.rest.tls), ("admin", app.admin.tls))
               if tls is not None]
    if secured:
        lines.append(f"  TLS:                   {', '.join(secured)}")
    lines.append(f"  try: curl {'--cacert CA.pem ' if app.rest.tls is not None else ''}"
                 f"{http}://{shown}:{app.rest_port}/v1/models/{first}")
    return "\n".join(lines)


