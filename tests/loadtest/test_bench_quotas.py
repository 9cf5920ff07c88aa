"""bench_quotas's pieces without a router: the shuffled-order requests, the flooder's bookkeeping
(and its child process against a fake gRPC server), the config-error detection and the report."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest

from loadtest.bench_quotas import (
    EXHAUSTED,
    FLOOD,
    INPUT_NAMES,
    QUOTAS,
    TENANT_HEADER,
    Flooder,
    FloodWindow,
    Phase,
    QuotaOutcome,
    RssSample,
    ShuffledRequests,
    SoakOutcome,
    detail_kind,
    flood_delta,
    headline,
    quota_config,
    quotas_refused,
    wire_input_order,
)
from loadtest.openloop import OK, OpenLoopResult
from protos import predict_pb2

# -- requests -------------------------------------------------------------------------


def test_shuffled_requests_vary_the_wire_order_and_keep_the_content() -> None:
    feed = ShuffledRequests(seed=5, rows=4)
    orders: Counter[tuple[str, ...]] = Counter()
    for _ in range(300):
        data = feed.build()
        order = tuple(wire_input_order(data))
        assert sorted(order) == sorted(INPUT_NAMES)
        orders[order] += 1
        req = predict_pb2.PredictRequest.FromString(data)
        assert req.model_spec.name == "ctr"
        assert req in [feed.reference(i) for i in range(4)]  # the same message as an ordinary build
    assert len(orders) > 150  # of 720: random orders, not one
    assert orders == feed.orders


def test_one_row_in_two_orders_is_the_same_message_in_different_bytes() -> None:
    feed = ShuffledRequests(seed=0, rows=2)
    first, second = list(INPUT_NAMES), list(reversed(INPUT_NAMES))
    a, b = feed.build_order(1, first), feed.build_order(1, second)
    assert a != b
    assert wire_input_order(a) == first and wire_input_order(b) == second
    parsed_a, parsed_b = predict_pb2.PredictRequest.FromString(a), predict_pb2.PredictRequest.FromString(b)
    assert parsed_a == parsed_b == feed.reference(1)
    inputs = parsed_a.inputs
    assert [d.size for d in inputs["dense"].tensor_shape.dim] == [1, 20]
    assert all([d.size for d in inputs[n].tensor_shape.dim] == [1] for n in INPUT_NAMES if n != "dense")
    with pytest.raises(ValueError):
        feed.build_order(0, first[:-1])


def test_the_wire_order_reader_on_a_message_with_other_fields() -> None:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "ctr"
    req.model_spec.version.value = 3
    req.output_filter.append("probability")
    req.inputs["x"].dtype = 1
    data = req.SerializeToString()
    assert wire_input_order(data) == ["x"]
    with pytest.raises(ValueError):
        wire_input_order(data[:-1])


# -- configs and the router's refusal -----------------------------------------------------


def test_the_quota_config_is_the_contract() -> None:
    config = quota_config(__import__("pathlib").Path("/m/ctr"))
    assert config["models"] == [{"name": "ctr", "base_path": "/m/ctr"}]
    assert config["workers"] == {"count": 2}
    assert config["quotas"]["tenant_header"] == TENANT_HEADER == "x-tenant"
    assert config["quotas"]["tenants"][FLOOD]["max_inflight"] == 8
    assert config["quotas"] is QUOTAS


def test_a_router_that_does_not_know_quotas_is_told_from_other_failures() -> None:
    tail = ("router exited with 2 before it was up:\n"
            "tfs-router: config error: /tmp/tfs-router-x.yaml: quotas: unknown key (known: admin, grpc, limits)\n")
    assert quotas_refused(tail) == ("tfs-router: config error: /tmp/tfs-router-x.yaml: quotas: unknown key "
                                    "(known: admin, grpc, limits)")
    assert quotas_refused("tfs-router: config error: models[0].base_path: required") is None
    assert quotas_refused("Traceback ...\nImportError: cannot import name 'quotas'") is None


# -- the flooder's bookkeeping --------------------------------------------------------------


def snapshot(t: float, counts: dict[str, int], named: int, retry: int, kinds: dict[str, Any]) -> dict[str, Any]:
    return {"time": t, "counts": counts, "named": named, "retry_after": retry, "kinds": kinds, "inflight": 0}


def test_a_flood_window_is_the_difference_of_two_snapshots() -> None:
    before = snapshot(100.0, {OK: 10, EXHAUSTED: 90}, 90, 80, {EXHAUSTED: {"tenant flood: N": 90}})
    after = snapshot(102.0, {OK: 410, EXHAUSTED: 3_690, "UNAVAILABLE": 1}, 3_689, 3_680,
                     {EXHAUSTED: {"tenant flood: N": 3_690}, "UNAVAILABLE": {"down": 1}})
    w = flood_delta(before, after)
    assert w.seconds == pytest.approx(2.0)
    assert (w.calls, w.ok, w.exhausted, w.other) == (4_001, 400, 3_600, 1)
    assert w.shed == pytest.approx(3_600 / 4_001)
    assert w.accepted_rate == pytest.approx(200.0)
    assert (w.named, w.retry_after) == (3_599, 3_600)
    assert w.kinds == {EXHAUSTED: {"tenant flood: N": 3_600}, "UNAVAILABLE": {"down": 1}}
    both = w + w
    assert (both.calls, both.seconds, both.named) == (8_002, 4.0, 7_198)
    assert math.isnan(FloodWindow(0.0, Counter(), 0, 0).shed)


def test_details_of_one_kind_count_together() -> None:
    assert detail_kind("tenant flood over rate_per_s 200 (burst 50), retry after 0.005s") == \
        detail_kind("tenant flood over rate_per_s 200 (burst 50), retry after 0.125s")


# -- the report ----------------------------------------------------------------------------


def open_loop(latencies_ms: list[float], codes: list[str] | None = None, rate: float = 500.0) -> OpenLoopResult[None]:
    n = len(latencies_ms)
    scheduled = np.arange(n, dtype=np.float64) / rate
    return OpenLoopResult(rate=rate, start=0.0, scheduled=scheduled, sent=scheduled + 0.0002,
                          done=scheduled + np.array(latencies_ms) / 1000, codes=codes or [OK] * n,
                          values=[None] * n)


def phase(round_: int, flooded: bool, latencies_ms: list[float], flood: FloodWindow | None = None,
          codes: list[str] | None = None) -> Phase:
    return Phase(round=round_, flooded=flooded, load=open_loop(latencies_ms, codes), flood=flood, cores={})


def soak_outcome() -> SoakOutcome:
    out = SoakOutcome(requests=200_000, warmup=20_000, concurrency=16,
                      pids={"router": 10, "w0": 11, "w1": 12})
    mb = 2**20
    out.samples = [
        RssSample("warm-up 50%", 10_000, {"router": 60 * mb, "w0": 600 * mb, "w1": 600 * mb}),
        RssSample("baseline", 0, {"router": 70 * mb, "w0": 630 * mb, "w1": 631 * mb}),
        RssSample("soak 50%", 100_000, {"router": int(72.5 * mb), "w0": 631 * mb, "w1": 631 * mb}),
        RssSample("end", 200_000, {"router": int(71.2 * mb), "w0": int(630.4 * mb), "w1": int(631.6 * mb)}),
    ]
    return out


def test_soak_growth_is_end_minus_baseline() -> None:
    out = soak_outcome()
    assert out.growth_mb("router") == pytest.approx(1.2, abs=0.01)
    assert out.peak_growth_mb("router") == pytest.approx(2.5, abs=0.01)
    assert out.within_target()
    out.samples[-1].rss["w1"] = None  # a worker gone
    assert math.isnan(out.growth_mb("w1")) and not out.within_target()


def quota_outcome() -> QuotaOutcome:
    flood = FloodWindow(10.0, Counter({OK: 2_000, EXHAUSTED: 28_000}), named=28_000, retry_after=28_000)
    alone = [2.0] * 98 + [10.0, 10.0]
    flooded = [2.5] * 98 + [12.1, 12.1]
    return QuotaOutcome(rate=500.0, phases=[
        phase(1, False, alone), phase(1, True, flooded, flood),
        phase(2, False, alone), phase(2, True, flooded, flood),
    ])


def test_the_headline_of_a_full_run() -> None:
    quotas = quota_outcome()
    s = quotas.summary()
    assert s.ratio == pytest.approx(12.1 / 10.0, rel=1e-6)
    assert s.round_ratios == pytest.approx([1.21, 1.21])
    assert s.flood.calls == 60_000 and s.flood.shed == pytest.approx(28 / 30)
    assert s.flood.accepted_rate == pytest.approx(200.0)
    assert s.steady_errors == 0 and s.refusal_problems() == []
    line = headline(quotas, soak_outcome())
    assert line == ("quotas: steady p99 with flood / alone 1.21 (target <= 1.5), flood shed 93% (0 steady errors); "
                    "soak 200,000 requests: RSS growth router +1.2 MB, w0 +0.4 MB, w1 +0.6 MB (target < 5 MB)")
    assert "\n" not in line


def test_the_headline_says_what_went_wrong() -> None:
    quotas = quota_outcome()
    bad = FloodWindow(5.0, Counter({OK: 10, EXHAUSTED: 80, "DEADLINE_EXCEEDED": 10}), named=70, retry_after=80)
    quotas.phases[1] = phase(1, True, [3.0] * 99 + [50.0], bad, codes=[OK] * 98 + [EXHAUSTED, "UNAVAILABLE"])
    s = quotas.summary()
    assert s.steady_errors == 2
    problems = s.refusal_problems()
    assert any("DEADLINE_EXCEEDED 10" in p for p in problems)
    assert any("10 of 28,080" in p for p in problems)
    soak = soak_outcome()
    soak.errors["UNAVAILABLE: x"] = 3
    soak.restarted = ["w1"]
    line = headline(quotas, soak)
    assert "(2 steady errors) [flood refusals NOT all RESOURCE_EXHAUSTED naming flood]" in line
    assert line.endswith("(target < 5 MB), 3 errors, restarted: w1")
    never = FloodWindow(1.0, Counter({OK: 500}), 0, 0)
    quotas.phases[1] = phase(1, True, [3.0] * 100, never)
    quotas.phases[3] = phase(2, True, [3.0] * 100, never)
    assert any("never refused" in p for p in quotas.summary().refusal_problems())


def test_the_headline_of_a_router_without_quotas() -> None:
    refused = QuotaOutcome(state="refused", message="tfs-router: config error: /tmp/r.yaml: quotas: unknown key "
                                                    "(known: admin, grpc)")
    line = headline(refused, soak_outcome())
    assert line.startswith("quotas: not measured, this router refuses the quotas config (unknown key); "
                           "soak 200,000 requests: RSS growth router +1.2 MB")
    failed = SoakOutcome(requests=10, state="failed", message="RuntimeError: router exited with 1")
    assert headline(QuotaOutcome(state="skipped"), failed) == \
        "quotas: not run (--only soak); soak: FAILED (RuntimeError: router exited with 1)"


# -- the flooder child process, against a fake server ---------------------------------------


def test_the_flooder_child_counts_refusals_by_code_and_checks_their_details() -> None:
    import grpc

    async def main() -> tuple[FloodWindow, dict[str, Any], Counter[str]]:
        seen: Counter[str] = Counter()
        n = 0

        async def predict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            nonlocal n
            n += 1
            tenant = dict(context.invocation_metadata() or ()).get(TENANT_HEADER, "")
            seen[tenant] += 1
            predict_pb2.PredictRequest.FromString(request)
            if n % 4 == 0:
                return bytes(predict_pb2.PredictResponse().SerializeToString())
            context.set_trailing_metadata((("retry-after", "1"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"tenant {tenant} quota max_inflight: {n}")
            raise AssertionError("abort() raises")

        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
            "Predict": grpc.unary_unary_rpc_method_handler(predict)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        flooder = await Flooder.start(f"127.0.0.1:{port}", concurrency=8, channels=2)
        try:
            idle = await flooder.command("mark")
            await asyncio.sleep(0.2)
            assert (await flooder.command("mark"))["counts"] == idle["counts"] == {}  # not running yet
            await flooder.command("run")
            before = await flooder.command("mark")
            await asyncio.sleep(0.5)
            after = await flooder.command("mark")
            paused = await flooder.command("pause")
            await asyncio.sleep(0.2)
            still = await flooder.command("mark")
        finally:
            await flooder.close()
            await server.stop(None)
        assert paused["inflight"] == 0 and still["counts"] == paused["counts"]
        assert flooder.proc.returncode == 0
        return flood_delta(before, after), paused, seen

    window, _, seen = asyncio.run(main())
    assert window.calls > 20 and window.other == 0
    assert window.exhausted > window.ok > 0
    assert window.named == window.exhausted == window.retry_after
    assert set(window.kinds[EXHAUSTED]) == {"tenant flood quota max_inflight: N"}
    assert set(seen) == {FLOOD}
