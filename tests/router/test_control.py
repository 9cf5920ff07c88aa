"""router.control (version policy, resolution, status, two-phase sync) and DataPlane.dispatch retries.

Backends, the pool, the control plane and the data plane are the real
objects; the one fake is ``FakeTransport``, a scripted stand-in for a TF
Serving worker behind the transport seam.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import config_pb2, metadata_pb2, model_pb2, predict_pb2, status_pb2, tensor_pb2, types_pb2
from router.config import Config, ModelConfig, from_dict
from router.control import Control, aspired, list_versions
from router.dataplane import DataPlane
from common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServingError,
    Unavailable,
)
from router.pool import DEAD, LOADING, READY, STARTING, Backend, Pool, Transport, TransportError

T = TypeVar("T")
State = status_pb2.ModelVersionStatus
AVAILABLE, END, LOADING_V = State.AVAILABLE, State.END, State.LOADING
Outcome = BaseException | predict_pb2.PredictResponse


# -- the fake worker ------------------------------------------------------------------------


def signature_map(cols: int = 2) -> metadata_pb2.SignatureDefMap:
    sigmap = metadata_pb2.SignatureDefMap()
    sig = sigmap.signature_def["serving_default"]
    sig.method_name = "tensorflow/serving/predict"
    for alias, table in ((sig.inputs["x"], "x:0"), (sig.outputs["y"], "y:0")):
        alias.name = table
        alias.dtype = types_pb2.DT_FLOAT
        alias.tensor_shape.dim.add(size=-1)
        alias.tensor_shape.dim.add(size=cols)
    sigmap.signature_def["__saved_model_init_op"].outputs["op"].name = "init"
    return sigmap


class FakeTransport:
    """A scripted TF Serving worker: loads what ReloadConfig asks, answers status and metadata.

    ``predict_script`` is a list of outcomes consumed one per Predict call (an
    exception is raised, a response returned); several fakes may share one
    list, so "the first call anywhere fails" is easy to say.  When it is empty
    Predict answers ``ok``.
    """

    def __init__(self, name: str = "", *, predict_script: list[Outcome] | None = None,
                 broken: Iterable[tuple[str, int]] = ()) -> None:
        self.name = name
        self.states: dict[str, dict[int, status_pb2.ModelVersionStatus]] = {}
        self.reloads: list[dict[str, tuple[int, ...]]] = []
        self.metadata_calls: list[tuple[str, int]] = []
        self.status_calls: list[str] = []
        self.predicts: list[predict_pb2.PredictRequest] = []
        self.timeouts: list[float] = []
        self.predict_script = [] if predict_script is None else predict_script
        self.broken = set(broken)  # (model, version) pairs that fail to load
        self.on_reload: Callable[[dict[str, tuple[int, ...]]], None] | None = None
        self.reload_error: BaseException | None = None
        self.closed = False
        self.ok = predict_pb2.PredictResponse()
        self.ok.outputs["y"].dtype = types_pb2.DT_FLOAT

    async def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        self.predicts.append(request)
        self.timeouts.append(timeout)
        await asyncio.sleep(0)
        if self.predict_script:
            outcome = self.predict_script.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return self.ok

    async def metadata(self, request: metadata_pb2.GetModelMetadataRequest,
                       timeout: float) -> metadata_pb2.GetModelMetadataResponse:
        spec = request.model_spec
        self.metadata_calls.append((spec.name, spec.version.value))
        assert list(request.metadata_field) == ["signature_def"]
        if not self.holds(spec.name, spec.version.value):
            raise NotFound(f"Servable not found for request: Specific({spec.name}, {spec.version.value})")
        resp = metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.CopyFrom(spec)
        resp.metadata["signature_def"].Pack(signature_map())
        return resp

    async def status(self, request: status_pb2.GetModelStatusRequest,
                     timeout: float) -> status_pb2.GetModelStatusResponse:
        name = request.model_spec.name
        self.status_calls.append(name)
        versions = self.states.get(name)
        if not versions:
            raise NotFound(f"Could not find any versions of model {name}")
        return status_pb2.GetModelStatusResponse(model_version_status=[versions[v] for v in sorted(versions)])

    async def reload(self, request: config_pb2.ReloadConfigRequest, timeout: float) -> config_pb2.ReloadConfigResponse:
        wanted = {c.name: tuple(c.model_version_policy.specific.versions)
                  for c in request.config.model_config_list.config}
        self.reloads.append(wanted)
        if self.on_reload is not None:
            self.on_reload(wanted)
        await asyncio.sleep(0)
        if self.reload_error is not None:
            raise self.reload_error
        for model, versions in wanted.items():
            states = self.states.setdefault(model, {})
            for v in list(states):
                if v not in versions and states[v].state == AVAILABLE:
                    states[v] = State(version=v, state=END)
            for v in versions:
                if (model, v) in self.broken:
                    states[v] = State(version=v, state=END, status=status_pb2.StatusProto(
                        error_code=status_pb2.INVALID_ARGUMENT, error_message="cannot load"))
                else:
                    states[v] = State(version=v, state=AVAILABLE)
        return config_pb2.ReloadConfigResponse()

    async def raw(self, method: str, body: bytes, timeout: float) -> bytes:
        return body

    async def healthy(self, timeout: float) -> bool:
        return True

    async def close(self) -> None:
        self.closed = True

    def holds(self, model: str, version: int) -> bool:
        st_ = self.states.get(model, {}).get(version)
        return st_ is not None and st_.state == AVAILABLE


def _conforms(t: FakeTransport) -> Transport:
    return t  # never called: lets mypy check FakeTransport against the Transport protocol


# -- helpers --------------------------------------------------------------------------------


def config(*models: dict[str, Any]) -> Config:
    return from_dict({"models": list(models) or [{"name": "m", "base_path": "/models/m"}]})


def vstatus(version: int, state: int = AVAILABLE, error: str = "") -> status_pb2.ModelVersionStatus:
    s = State(version=version, state=state)
    if error:
        s.status.error_code = status_pb2.UNKNOWN
        s.status.error_message = error
    return s


def backend(name: str, held: dict[str, dict[int, int]] | None = None, *, state: str = READY,
            max_inflight: int = 4, transport: FakeTransport | None = None) -> Backend:
    versions = {m: {v: vstatus(v, s) for v, s in vs.items()} for m, vs in (held or {}).items()}
    return Backend(name, f"unix:/tmp/{name}.sock", max_inflight, transport=transport or FakeTransport(name),
                   state=state, versions=versions)


def fake(b: Backend) -> FakeTransport:
    assert isinstance(b.transport, FakeTransport)
    return b.transport


def make_pool(*backends: Backend, max_queued: int = 16) -> Pool:
    return Pool(backends, max_queued=max_queued, rng=random.Random(0))


def spec(name: str = "m", version: int | None = None, label: str | None = None) -> model_pb2.ModelSpec:
    s = model_pb2.ModelSpec(name=name)
    if version is not None:
        s.version.value = version
    if label is not None:
        s.version_label = label
    return s


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 5))


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


# -- aspired(): the version policy ------------------------------------------------------------


def model(policy: str) -> ModelConfig:
    return ModelConfig("m", "/m", version_policy=policy)


@pytest.mark.parametrize(
    ("policy", "found", "expected"),
    [
        ("latest", [1, 2, 3], (3,)),
        ("latest:2", [1, 2, 3], (2, 3)),
        ("latest:5", [1, 2, 3], (1, 2, 3)),
        ("latest", [], ()),
        ("latest:3", [7], (7,)),
        ("all", [1, 4, 9], (1, 4, 9)),
        ("all", [], ()),
        ("specific:3,1", [1, 2, 3], (1, 3)),
        ("specific:5", [1, 2], (5,)),  # asked for even before it exists: resolve says UNAVAILABLE
    ],
)
def test_aspired(policy: str, found: list[int], expected: tuple[int, ...]) -> None:
    assert aspired(model(policy), found) == expected


@settings(max_examples=200, deadline=None)
@given(found=st.lists(st.integers(0, 1000), unique=True).map(sorted), n=st.integers(1, 8))
def test_latest_n_is_the_n_newest(found: list[int], n: int) -> None:
    got = aspired(model(f"latest:{n}"), found)
    assert list(got) == found[-n:]
    assert len(got) == min(n, len(found))
    assert all(v > other for v in got for other in set(found) - set(got))


def test_list_versions_and_scan(tmp_path: Path) -> None:
    base = tmp_path / "m"
    for d in ("1", "2", "10", "tmp", "3x"):
        (base / d).mkdir(parents=True)
    (base / "4").write_text("a file, not a version")
    assert list_versions(str(base)) == [1, 2, 10]
    assert list_versions(str(tmp_path / "missing")) == []
    assert list_versions(str(base / "4")) == []
    cfg = config({"name": "m", "base_path": str(base), "version_policy": "latest:2"},
                 {"name": "n", "base_path": str(tmp_path / "none")})
    assert Control(cfg, make_pool()).scan() == {"m": (2, 10), "n": ()}


# -- resolve -------------------------------------------------------------------------------------


def resolver(aspire: tuple[int, ...] = (1, 2, 3, 4)) -> Control:
    a = backend("a", {"m": {1: AVAILABLE, 2: AVAILABLE, 3: LOADING_V}})
    b = backend("b", {"m": {3: AVAILABLE}}, state=DEAD)
    c = backend("c", {"m": {2: AVAILABLE}})
    cfg = config({"name": "m", "base_path": "/m", "version_labels": {"stable": 1, "canary": 4, "gone": 9}},
                 {"name": "empty", "base_path": "/e"})
    control = Control(cfg, make_pool(a, b, c))
    control.aspired = {"m": aspire, "empty": ()}
    return control


def test_resolve_latest_is_the_highest_available() -> None:
    control = resolver()
    assert control.resolve(spec()) == 2  # 3 is only on a dead worker or still loading
    control.pool.by_name("b").state = READY
    assert control.resolve(spec()) == 3


def test_resolve_explicit_version() -> None:
    control = resolver()
    assert control.resolve(spec(version=1)) == 1
    with pytest.raises(Unavailable, match="version 3 of model m"):
        control.resolve(spec(version=3))  # aspired, loading
    with pytest.raises(NotFound, match=r"Specific\(m, 7\)"):
        control.resolve(spec(version=7))


def test_resolve_labels() -> None:
    control = resolver()
    assert control.resolve(spec(label="stable")) == 1
    with pytest.raises(Unavailable):
        control.resolve(spec(label="canary"))  # names aspired version 4, not loaded anywhere
    with pytest.raises(NotFound):
        control.resolve(spec(label="gone"))
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label: beta"):
        control.resolve(spec(label="beta"))


def test_resolve_unknown_model_is_not_found() -> None:
    with pytest.raises(NotFound, match=r"Latest\(nope\)"):
        resolver().resolve(spec("nope"))
    with pytest.raises(NotFound):
        resolver().resolve(spec("nope", version=1))


def test_resolve_latest_with_nothing_available() -> None:
    control = resolver()
    with pytest.raises(NotFound, match=r"Latest\(empty\)"):
        control.resolve(spec("empty"))  # nothing on disk either
    control.aspired["empty"] = (1,)
    with pytest.raises(Unavailable, match="no version available yet"):
        control.resolve(spec("empty"))


def test_ready_needs_every_model_somewhere() -> None:
    control = resolver()
    assert not control.ready()
    c = control.pool.by_name("c")
    c.versions = {**c.versions, "empty": {1: vstatus(1)}}  # versions are replaced, never mutated
    assert control.ready()


# -- status aggregation ------------------------------------------------------------------------------


def status_control() -> Control:
    a = backend("a")
    a.versions = {"m": {1: vstatus(1), 2: vstatus(2, END, "load failed on a"),
                        3: vstatus(3, END, "load failed"), 4: vstatus(4, END, "broken")}}
    b = backend("b", state=LOADING)
    b.versions = {"m": {2: vstatus(2), 3: vstatus(3, LOADING_V)}}
    dead = backend("dead", state=DEAD)
    dead.versions = {"m": {4: vstatus(4), 5: vstatus(5)}}
    cfg = config({"name": "m", "base_path": "/m", "version_labels": {"stable": 2, "old": 7}},
                 {"name": "n", "base_path": "/n"})
    return Control(cfg, make_pool(a, b, dead))


def test_status_aggregates_over_workers() -> None:
    resp = status_control().status(spec())
    got = {s.version: (State.State.Name(s.state), s.status.error_message) for s in resp.model_version_status}
    assert got == {
        1: ("AVAILABLE", ""),
        2: ("AVAILABLE", ""),  # available on b wins over a's failure
        3: ("LOADING", ""),  # still loading on b: not an error yet
        4: ("END", "broken"),  # nobody has it better (the dead worker does not count)
    }
    assert [s.version for s in resp.model_version_status] == [1, 2, 3, 4]


def test_status_of_one_version() -> None:
    control = status_control()
    only = control.status(spec(version=4)).model_version_status
    assert [(s.version, s.state, s.status.error_message) for s in only] == [(4, END, "broken")]
    assert [s.version for s in control.status(spec(label="stable")).model_version_status] == [2]
    with pytest.raises(NotFound, match="version 5 of model m"):
        control.status(spec(version=5))  # only the dead worker had it
    with pytest.raises(NotFound, match="version 7"):
        control.status(spec(label="old"))
    with pytest.raises(InvalidArgument, match="label: new"):
        control.status(spec(label="new"))


def test_status_unknown_or_unloaded_model() -> None:
    control = status_control()
    with pytest.raises(NotFound, match="any versions of model nope"):
        control.status(spec("nope"))
    with pytest.raises(NotFound, match="any versions of model n"):
        control.status(spec("n"))


# -- sync: the two-phase reload --------------------------------------------------------------------


def synced(*names: str, aspire: tuple[int, ...] = (1,), max_inflight: int = 4,
           models: tuple[dict[str, Any], ...] = (),
           on_change: Callable[[], None] | None = None) -> tuple[Control, list[Backend]]:
    backends = [backend(n, state=STARTING, max_inflight=max_inflight) for n in names]
    cfg = config(*models) if models else config()
    control = Control(cfg, make_pool(*backends), rpc_timeout=3.0, on_change=on_change)
    control.aspired = {m.name: () for m in cfg.models} | {"m": aspire}
    return control, backends


def test_sync_fresh_worker_loads_the_aspired_versions() -> None:
    control, [a] = synced("a", aspire=(1, 2))

    async def main() -> None:
        assert await control.sync(a) is True
        assert a.state == READY
        assert a.available("m") == {1, 2}
        assert fake(a).reloads[0] == {"m": (1, 2)}
        assert fake(a).reloads[-1] == {"m": (1, 2)}
        assert sorted(fake(a).metadata_calls) == [("m", 1), ("m", 2)]
        assert set(control.metadata("m", 1).signatures) == {"serving_default"}  # init op skipped

    run(main())


def test_sync_reload_request_names_every_model_with_specific_versions() -> None:
    control, [a] = synced("a", aspire=(3,), models=(
        {"name": "m", "base_path": "rel/m"}, {"name": "n", "base_path": "/n"}))
    req = control.reload_request({"m": (1, 3)})
    configs = {c.name: c for c in req.config.model_config_list.config}
    assert list(configs) == ["m", "n"]
    assert list(configs["m"].model_version_policy.specific.versions) == [1, 3]
    assert list(configs["n"].model_version_policy.specific.versions) == []
    assert configs["m"].base_path.startswith("/") and configs["m"].base_path.endswith("rel/m")
    assert configs["m"].model_platform == "tensorflow"

    async def main() -> None:
        assert await control.sync(a)
        assert fake(a).status_calls.count("n") >= 1  # NOT_FOUND for n: simply holds nothing
        assert a.versions["n"] == {}

    run(main())


def test_sync_rollover_is_two_phase_and_stops_routing_before_unloading() -> None:
    control, [a] = synced("a", aspire=(1,))
    checks: list[str] = []

    async def main() -> None:
        assert await control.sync(a)
        before = len(fake(a).reloads)
        control.aspired = {"m": (2,)}

        def on_reload(wanted: dict[str, tuple[int, ...]]) -> None:
            if wanted == {"m": (1, 2)}:
                # Phase 1: the old version is still served while the new one loads.
                assert a.holds("m", 1) and control.pool.holders("m", 1) == [a]
                assert control.resolve(spec()) == 1
                checks.append("phase 1")
            elif wanted == {"m": (2,)}:
                # Phase 2: the router stopped routing to 1 before asking the worker to drop it.
                assert not a.holds("m", 1)
                assert control.pool.holders("m", 1) == []
                assert a.holds("m", 2) and control.resolve(spec()) == 2
                with pytest.raises(NotFound):
                    control.resolve(spec(version=1))
                checks.append("phase 2")
            else:  # pragma: no cover - a failure message with the request in it
                raise AssertionError(f"unexpected reload {wanted}")

        fake(a).on_reload = on_reload
        assert await control.sync(a) is True
        assert checks == ["phase 1", "phase 2"]
        assert fake(a).reloads[before:] == [{"m": (1, 2)}, {"m": (2,)}]
        assert a.state == READY and a.available("m") == {2}
        assert fake(a).metadata_calls == [("m", 1), ("m", 2)]  # once per (model, version)

    run(main())


def test_sync_without_change_sends_one_reload() -> None:
    control, [a] = synced("a", aspire=(1,))

    async def main() -> None:
        assert await control.sync(a)
        n = len(fake(a).reloads)
        assert await control.sync(a)
        assert fake(a).reloads[n:] == [{"m": (1,)}]
        assert fake(a).metadata_calls == [("m", 1)]

    run(main())


def test_sync_fails_waiters_for_the_dropped_version_before_unloading() -> None:
    control, [a] = synced("a", aspire=(1,), max_inflight=1)

    async def main() -> None:
        assert await control.sync(a)
        busy = control.pool.try_acquire("m", 1)
        assert busy is a
        waiter = asyncio.ensure_future(control.pool.acquire("m", 1, soon()))
        await asyncio.sleep(0)
        assert control.pool.queued == 1
        seen: list[int] = []
        fake(a).on_reload = lambda wanted: seen.append(control.pool.queued) if wanted == {"m": (2,)} else None
        control.aspired = {"m": (2,)}
        assert await control.sync(a)
        assert seen == [0]  # nobody waits for version 1 when the worker is told to drop it
        with pytest.raises(Unavailable):
            await waiter
        control.pool.release(a, "m")
        assert a.inflight == 0

    run(main())


def test_sync_fetches_metadata_once_per_version_across_workers() -> None:
    control, backends = synced("a", "b", "c", aspire=(1, 2))

    async def main() -> None:
        for b in backends:
            assert await control.sync(b)
        control.aspired = {"m": (2, 3)}
        for b in backends:
            assert await control.sync(b)
        calls = [c for b in backends for c in fake(b).metadata_calls]
        assert sorted(calls) == [("m", 1), ("m", 2), ("m", 3)]
        assert all(b.available("m") == {2, 3} and b.state == READY for b in backends)

    run(main())


def test_sync_version_that_fails_to_load_is_not_routed() -> None:
    control, [a] = synced("a", aspire=(1,))

    async def main() -> None:
        fake(a).broken.add(("m", 1))
        assert await control.sync(a) is True  # the worker answers; it just holds nothing
        assert a.available("m") == set() and fake(a).metadata_calls == []
        st_ = control.status(spec()).model_version_status
        assert [(s.version, s.state, s.status.error_message) for s in st_] == [(1, END, "cannot load")]
        with pytest.raises(Unavailable):
            control.resolve(spec())

    run(main())


def test_sync_error_leaves_a_new_worker_out_of_rotation() -> None:
    changes: list[str] = []
    control, [a] = synced("a", on_change=lambda: changes.append(a.state))

    async def main() -> None:
        fake(a).reload_error = TransportError("worker unavailable: gone")
        assert await control.sync(a) is False
        assert a.state == LOADING and not a.routable
        assert changes == [LOADING]
        fake(a).reload_error = None
        assert await control.sync(a) is True
        assert a.state == READY and changes == [LOADING, READY]

    run(main())


def test_sync_of_a_restarted_worker_does_not_mark_it_ready() -> None:
    control, [a] = synced("a")

    async def main() -> None:
        def restart(wanted: dict[str, tuple[int, ...]]) -> None:
            # The worker died and came back mid-sync (what App._connect does).
            a.generation += 1
            a.state = STARTING
            a.versions = {}

        fake(a).on_reload = restart
        assert await control.sync(a) is False
        assert a.state == STARTING and a.versions == {}

    run(main())


def test_sync_skips_dead_and_disconnected_workers() -> None:
    control, [a, b] = synced("a", "b")

    async def main() -> None:
        a.state = DEAD
        b.transport = None
        assert await control.sync(a) is False
        assert await control.sync(b) is False
        assert fake(a).reloads == [] and fake(a).status_calls == []
        assert a.state == DEAD and b.state == STARTING

    run(main())


def test_concurrent_syncs_of_one_worker_are_serialized() -> None:
    control, [a] = synced("a", aspire=(1,))
    active: list[int] = [0]
    most: list[int] = [0]

    async def main() -> None:
        original = fake(a).reload

        async def reload(request: config_pb2.ReloadConfigRequest, timeout: float) -> config_pb2.ReloadConfigResponse:
            active[0] += 1
            most[0] = max(most[0], active[0])
            try:
                await asyncio.sleep(0.001)
                return await original(request, timeout)
            finally:
                active[0] -= 1

        fake(a).reload = reload  # type: ignore[method-assign]
        assert all(await asyncio.gather(control.sync(a), control.sync(a), control.sync(a)))
        assert most[0] == 1

    run(main())


# -- DataPlane.dispatch: retries -------------------------------------------------------------------


def dataplane(n: int = 2, *, script: list[Outcome] | None = None, max_inflight: int = 4,
              clock: Callable[[], float] = time.monotonic) -> tuple[DataPlane, list[Backend], list[tuple[str, str]]]:
    shared: list[Outcome] = [] if script is None else script
    backends = [backend(f"w{i}", {"m": {1: AVAILABLE}}, max_inflight=max_inflight,
                        transport=FakeTransport(f"w{i}", predict_script=shared)) for i in range(n)]
    pool = make_pool(*backends)
    control = Control(config(), pool)
    control.aspired = {"m": (1,)}
    retries: list[tuple[str, str]] = []
    return DataPlane(control, pool, on_retry=lambda m, why: retries.append((m, why)), clock=clock), backends, retries


async def predict_call(transport: Transport, timeout: float) -> predict_pb2.PredictResponse:
    return await transport.predict(predict_pb2.PredictRequest(), timeout)


def calls(backends: list[Backend]) -> list[int]:
    return [len(fake(b).predicts) for b in backends]


def test_dispatch_success_releases_the_slot() -> None:
    dp, backends, retries = dataplane(2)

    async def main() -> None:
        resp = await dp.dispatch("m", 1, predict_call, soon())
        assert "y" in resp.outputs
        assert sum(calls(backends)) == 1 and retries == []
        assert [b.inflight for b in backends] == [0, 0]

    run(main())


def test_dispatch_passes_the_remaining_deadline() -> None:
    now = [100.0]
    dp, [a], _ = dataplane(1, clock=lambda: now[0])

    async def main() -> None:
        await dp.dispatch("m", 1, predict_call, 102.5)
        assert fake(a).timeouts == [2.5]

    run(main())


def test_dispatch_retries_once_elsewhere_on_transport_error() -> None:
    dp, backends, retries = dataplane(2, script=[TransportError("worker unavailable: reset")])

    async def main() -> None:
        resp = await dp.dispatch("m", 1, predict_call, soon())
        assert "y" in resp.outputs
        assert calls(backends) == [1, 1]  # the retry went to the other worker
        assert retries == [("m", "worker_unavailable")]
        assert [b.inflight for b in backends] == [0, 0]

    run(main())


def test_dispatch_transport_error_without_another_holder_raises() -> None:
    dp, backends, retries = dataplane(2, script=[TransportError("worker unavailable: reset")])
    backends[1].versions = {"m": {2: vstatus(2)}}  # the other worker holds another version

    async def main() -> None:
        with pytest.raises(TransportError):
            await dp.dispatch("m", 1, predict_call, soon())
        assert calls(backends) == [1, 0] and retries == []
        assert [b.inflight for b in backends] == [0, 0]

    run(main())


def test_dispatch_retries_only_once() -> None:
    script: list[Outcome] = [TransportError("worker unavailable: 1"), TransportError("worker unavailable: 2")]
    dp, backends, retries = dataplane(3, script=script)

    async def main() -> None:
        with pytest.raises(TransportError, match="2"):
            await dp.dispatch("m", 1, predict_call, soon())
        assert sorted(calls(backends)) == [0, 1, 1]
        assert retries == [("m", "worker_unavailable")]
        assert [b.inflight for b in backends] == [0, 0, 0]

    run(main())


def test_dispatch_retry_waits_for_another_worker_not_the_failed_one() -> None:
    dp, [a, b], retries = dataplane(2, script=[TransportError("worker unavailable")], max_inflight=1)

    async def main() -> None:
        assert dp.pool.try_acquire("m", 1) is not None  # one worker busy: the call lands on the other
        busy = a if a.inflight else b
        free = b if busy is a else a
        task = asyncio.ensure_future(dp.dispatch("m", 1, predict_call, soon()))
        for _ in range(10):
            await asyncio.sleep(0)
        # free failed; its slot is free again, but the retry waits for busy.
        assert len(fake(free).predicts) == 1 and not task.done()
        assert free.inflight == 0 and dp.pool.queued == 1
        dp.pool.release(busy, "m")
        await task
        assert len(fake(busy).predicts) == 1 and len(fake(free).predicts) == 1
        assert [a.inflight, b.inflight] == [0, 0]

    run(main())


def test_dispatch_not_found_is_retried_once_elsewhere() -> None:
    dp, backends, retries = dataplane(2, script=[NotFound("Servable not found for request: Specific(m, 1)")])

    async def main() -> None:
        await dp.dispatch("m", 1, predict_call, soon())
        assert calls(backends) == [1, 1]
        assert retries == [("m", "version_moved")]

    run(main())


def test_dispatch_not_found_twice_or_alone_is_raised() -> None:
    dp, backends, retries = dataplane(2, script=[NotFound("1"), NotFound("2")])

    async def main() -> None:
        with pytest.raises(NotFound, match="2"):
            await dp.dispatch("m", 1, predict_call, soon())
        assert calls(backends) == [1, 1]

    run(main())
    dp, backends, retries = dataplane(1, script=[NotFound("gone")])
    with pytest.raises(NotFound):
        run(dp.dispatch("m", 1, predict_call, soon()))
    assert retries == []


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("input 'x' expects dtype DT_FLOAT"),
        FailedPrecondition("signature not found"),
        Unavailable("the worker itself said UNAVAILABLE"),  # not a transport failure
        DeadlineExceeded("worker timed out"),
    ],
)
def test_dispatch_other_errors_are_not_retried(error: ServingError) -> None:
    dp, backends, retries = dataplane(2, script=[error])

    async def main() -> None:
        with pytest.raises(type(error)) as info:
            await dp.dispatch("m", 1, predict_call, soon())
        assert type(info.value) is type(error)
        assert sum(calls(backends)) == 1 and retries == []
        assert [b.inflight for b in backends] == [0, 0]

    run(main())


def test_dispatch_with_deadline_already_gone() -> None:
    dp, backends, _ = dataplane(1)

    async def main() -> None:
        with pytest.raises(DeadlineExceeded, match="before the request reached a worker"):
            await dp.dispatch("m", 1, predict_call, time.monotonic() - 0.001)
        assert calls(backends) == [0] and backends[0].inflight == 0

    run(main())


def test_predict_is_normalized_before_dispatch() -> None:
    cfg = config({"name": "m", "base_path": "/m", "version_labels": {"stable": 1},
                  "batching": {"enabled": False}})
    a = backend("a", state=STARTING)
    pool = make_pool(a)
    control = Control(cfg, pool)
    control.aspired = {"m": (1, 2)}
    dp = DataPlane(control, pool)

    async def main() -> None:
        assert await control.sync(a)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "m"
        request.model_spec.version_label = "stable"
        x = request.inputs["x"]
        x.dtype = types_pb2.DT_FLOAT
        x.tensor_shape.dim.add(size=1)
        x.tensor_shape.dim.add(size=2)
        x.float_val.extend([1.0, 2.0])
        await dp.predict(request, soon())
        [sent] = fake(a).predicts
        assert sent.model_spec.WhichOneof("version_choice") == "version"
        assert sent.model_spec.version.value == 1
        assert sent.model_spec.signature_name == "serving_default"

        bad = predict_pb2.PredictRequest()
        bad.model_spec.name = "m"
        bad.inputs["x"].CopyFrom(tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64))
        with pytest.raises(InvalidArgument):
            await dp.predict(bad, soon())
        assert len(fake(a).predicts) == 1  # refused before it cost the worker anything

    run(main())
