"""router.dispatch (a slot on a worker, the remaining deadline, one retry elsewhere) and the data plane above it:
normalization, the version chosen again when it left the pool, forwarded calls through the pool's slots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from shared.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServingError,
    Unavailable,
)
from protos import model_pb2, predict_pb2, status_pb2, tensor_pb2, types_pb2
from router.control import sync
from router.registry import Registry
from router.dispatch import Dispatcher
from router.dataplane import DataPlane
from router.pool import DRAINING, READY, STARTING, Backend
from router.transport import Transport, TransportError
from tests.router.fakes import FakeTransport, Outcome
from tests.router.pools import AVAILABLE, backend, config, fake, make_pool, run, soon, vstatus





# -- Dispatcher.send: retries -------------------------------------------------------------------


def dataplane(n: int = 2, *, script: list[Outcome] | None = None, max_inflight: int = 4,
              clock: Callable[[], float] = time.monotonic) -> tuple[DataPlane, list[Backend], list[tuple[str, str]]]:
    shared: list[Outcome] = [] if script is None else script
    backends = [backend(f"w{i}", {"m": {1: AVAILABLE}}, max_inflight=max_inflight,
                        transport=FakeTransport(f"w{i}", predict_script=shared)) for i in range(n)]
    pool = make_pool(*backends)
    control = Registry(config(), pool)
    control.aspired = {"m": (1,)}
    retries: list[tuple[str, str]] = []
    dispatcher = Dispatcher(pool, on_retry=lambda m, why: retries.append((m, why)), clock=clock)
    return DataPlane(control, dispatcher, clock=clock), backends, retries


async def predict_call(transport: Transport, timeout: float) -> predict_pb2.PredictResponse:
    return await transport.predict(predict_pb2.PredictRequest(), timeout)


def calls(backends: list[Backend]) -> list[int]:
    return [len(fake(b).predicts) for b in backends]


def test_dispatch_success_releases_the_slot() -> None:
    dp, backends, retries = dataplane(2)

    async def main() -> None:
        resp = await dp.dispatcher.send("m", 1, predict_call, soon())
        assert "y" in resp.outputs
        assert sum(calls(backends)) == 1 and retries == []
        assert [b.inflight for b in backends] == [0, 0]

    run(main())


def test_dispatch_passes_the_remaining_deadline() -> None:
    now = [100.0]
    dp, [a], _ = dataplane(1, clock=lambda: now[0])

    async def main() -> None:
        await dp.dispatcher.send("m", 1, predict_call, 102.5)
        assert fake(a).timeouts == [2.5]

    run(main())


def test_dispatch_retries_once_elsewhere_on_transport_error() -> None:
    dp, backends, retries = dataplane(2, script=[TransportError("worker unavailable: reset")])

    async def main() -> None:
        resp = await dp.dispatcher.send("m", 1, predict_call, soon())
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
            await dp.dispatcher.send("m", 1, predict_call, soon())
        assert calls(backends) == [1, 0] and retries == []
        assert [b.inflight for b in backends] == [0, 0]

    run(main())


def test_dispatch_retries_only_once() -> None:
    script: list[Outcome] = [TransportError("worker unavailable: 1"), TransportError("worker unavailable: 2")]
    dp, backends, retries = dataplane(3, script=script)

    async def main() -> None:
        with pytest.raises(TransportError, match="2"):
            await dp.dispatcher.send("m", 1, predict_call, soon())
        assert sorted(calls(backends)) == [0, 1, 1]
        assert retries == [("m", "worker_unavailable")]
        assert [b.inflight for b in backends] == [0, 0, 0]

    run(main())


def test_dispatch_retry_waits_for_another_worker_not_the_failed_one() -> None:
    dp, [a, b], retries = dataplane(2, script=[TransportError("worker unavailable")], max_inflight=1)

    async def main() -> None:
        assert dp.dispatcher.pool.try_acquire("m", 1) is not None  # one worker busy: the call lands on the other
        busy = a if a.inflight else b
        free = b if busy is a else a
        task = asyncio.ensure_future(dp.dispatcher.send("m", 1, predict_call, soon()))
        for _ in range(10):
            await asyncio.sleep(0)
        # free failed; its slot is free again, but the retry waits for busy.
        assert len(fake(free).predicts) == 1 and not task.done()
        assert free.inflight == 0 and dp.dispatcher.pool.queued == 1
        dp.dispatcher.pool.release(busy, "m")
        await task
        assert len(fake(busy).predicts) == 1 and len(fake(free).predicts) == 1
        assert [a.inflight, b.inflight] == [0, 0]

    run(main())


def test_dispatch_not_found_is_retried_once_elsewhere() -> None:
    dp, backends, retries = dataplane(2, script=[NotFound("Servable not found for request: Specific(m, 1)")])

    async def main() -> None:
        await dp.dispatcher.send("m", 1, predict_call, soon())
        assert calls(backends) == [1, 1]
        assert retries == [("m", "version_moved")]

    run(main())


def test_dispatch_not_found_twice_or_alone_is_raised() -> None:
    dp, backends, retries = dataplane(2, script=[NotFound("1"), NotFound("2")])

    async def main() -> None:
        with pytest.raises(NotFound, match="2"):
            await dp.dispatcher.send("m", 1, predict_call, soon())
        assert calls(backends) == [1, 1]

    run(main())
    dp, backends, retries = dataplane(1, script=[NotFound("gone")])
    with pytest.raises(NotFound):
        run(dp.dispatcher.send("m", 1, predict_call, soon()))
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
            await dp.dispatcher.send("m", 1, predict_call, soon())
        assert type(info.value) is type(error)
        assert sum(calls(backends)) == 1 and retries == []
        assert [b.inflight for b in backends] == [0, 0]

    run(main())


def test_dispatch_with_deadline_already_gone() -> None:
    dp, backends, _ = dataplane(1)

    async def main() -> None:
        with pytest.raises(DeadlineExceeded, match="before the request reached a worker"):
            await dp.dispatcher.send("m", 1, predict_call, time.monotonic() - 0.001)
        assert calls(backends) == [0] and backends[0].inflight == 0

    run(main())


def test_predict_is_normalized_before_dispatch() -> None:
    cfg = config({"name": "m", "base_path": "/m", "version_labels": {"stable": 1},
                  "batching": {"enabled": False}})
    a = backend("a", state=STARTING)
    pool = make_pool(a)
    control = Registry(cfg, pool)
    control.aspired = {"m": (1, 2)}
    dp = DataPlane(control, Dispatcher(pool))

    async def main() -> None:
        await sync.hold(a, cfg.models, {"m": frozenset({1, 2})}, control, a.generation, 5)
        a.state = READY
        control.switch("m", 2)
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


def test_unversioned_request_whose_version_is_withdrawn_goes_to_the_new_default() -> None:
    cfg = config({"name": "m", "base_path": "/m", "batching": {"enabled": False}})
    a = backend("a", {"m": {1: AVAILABLE, 2: AVAILABLE}}, max_inflight=1)
    pool = make_pool(a)
    registry = Registry(cfg, pool)
    registry.aspired = {"m": (1, 2)}
    registry.switch("m", 1)
    retries: list[tuple[str, str]] = []
    dp = DataPlane(registry, Dispatcher(pool, on_retry=lambda m, why: retries.append((m, why))))

    def request(version: int | None = None) -> predict_pb2.PredictRequest:
        r = predict_pb2.PredictRequest()
        r.model_spec.name = "m"
        if version is not None:
            r.model_spec.version.value = version
        x = r.inputs["x"]
        x.dtype = types_pb2.DT_FLOAT
        x.tensor_shape.dim.add(size=1)
        x.tensor_shape.dim.add(size=2)
        x.float_val.extend([1.0, 2.0])
        return r

    async def main() -> None:
        await sync.hold(a, cfg.models, {"m": frozenset({1, 2})}, registry, a.generation, 5)
        assert pool.try_acquire("m", 1) is a  # the only slot is busy: requests wait for it
        unversioned = asyncio.ensure_future(dp.predict(request(), soon()))
        explicit = asyncio.ensure_future(dp.predict(request(1), soon()))
        await asyncio.sleep(0.01)
        assert pool.queued == 2
        # The switch, then version 1 leaves the pool while both wait for it.
        registry.switch("m", 2)
        registry.aspired = {"m": (2,)}
        a.versions = {"m": {2: vstatus(2)}}
        pool.fail_waiters()
        with pytest.raises(NotFound, match="it was unloaded"):
            await explicit  # asked for version 1 by name: it is gone
        pool.release(a, "m")
        response = await unversioned
        assert fake(a).predicts[-1].model_spec.version.value == 2 and response is fake(a).ok
        assert retries == [("m", "version_withdrawn")]

    run(main())


# -- forwarded calls (Classify, Regress, MultiInference) go through the pool's slots --------------

CLASSIFY = "/tensorflow.serving.PredictionService/Classify"
MULTI = "/tensorflow.serving.PredictionService/MultiInference"


def classify_body(model: str = "m") -> bytes:
    # Classify's ModelSpec is field 1, like GetModelStatusRequest's.
    return bytes(status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=model)).SerializeToString())


@pytest.mark.parametrize("method", [CLASSIFY, MULTI])
def test_a_forwarded_call_holds_a_slot_and_a_drain_waits_for_it(method: str) -> None:
    dp, [a], _ = dataplane(1)
    dp.control.switch("m", 1)
    gate = fake(a).raw_gate = asyncio.Event()

    async def main() -> None:
        send = dp.forward_any if method == MULTI else dp.forward
        call = asyncio.ensure_future(send(method, classify_body(), soon()))
        for _ in range(100):
            if fake(a).raws or call.done():
                break
            await asyncio.sleep(0)
        assert fake(a).raws and a.inflight == 1  # counted like a Predict
        dp.dispatcher.pool.set_state(a, DRAINING)
        idle = asyncio.ensure_future(dp.dispatcher.pool.wait_idle(a, 5))
        await asyncio.sleep(0.02)
        assert not idle.done()  # the drain waits for it
        gate.set()
        assert await call == classify_body()
        assert await idle and a.inflight == 0

    run(main())


@pytest.mark.parametrize("method", [CLASSIFY, MULTI])
def test_a_forwarded_call_whose_worker_dies_is_retried_once_elsewhere(method: str) -> None:
    dp, backends, retries = dataplane(2)
    dp.control.switch("m", 1)
    script: list[Outcome] = [TransportError("worker unavailable: reset")]
    for b in backends:
        fake(b).raw_script = script  # shared: the first call anywhere fails

    async def main() -> None:
        send = dp.forward_any if method == MULTI else dp.forward
        assert await send(method, classify_body(), soon()) == classify_body()
        assert sorted(len(fake(b).raws) for b in backends) == [1, 1]
        assert [why for _, why in retries] == ["worker_unavailable"]
        assert [b.inflight for b in backends] == [0, 0]

    run(main())


def test_multi_inference_with_no_worker_in_rotation_is_unavailable() -> None:
    dp, [a], _ = dataplane(1)
    dp.dispatcher.pool.set_state(a, DRAINING)
    with pytest.raises(Unavailable):
        run(dp.forward_any(MULTI, b"", soon()))
