"""The coalescing acceptance benchmark: batch-1 clients, router with and without batching.

    python -m loadtest.bench_batching [--seconds 5] [--model-dir models/ctr]

Starts, in one run on the same machine (all stay up; only the target being
measured gets load, and an idle process costs nothing):

1. the router with coalescing: the default config (``configs/local.yaml``:
   2 spawned workers, batching on) on free ports;
2. the same router with ``--no-batching``;
3. one worker called directly (``python -m workers``, default flags);
4. ``loadtest.fixed_reply``: a grpc.aio server answering every Predict with
   the same pre-serialized bytes, i.e. the ceiling of the client and gRPC
   on this machine with no model in the way;
5. ``loadtest.inline_rest``: a hand-written aiohttp server calling the
   model inline on its event loop (the REST baseline).

gRPC steps use the official client (``PredictionServiceStub`` on one grpc.aio
channel, 16 distinct one-row PredictRequests built ahead of time), in closed
loop at concurrency 64 against 1-4, then at concurrency 1 against 1 and 2
turn about (ten alternating windows each, pooled, so drift hits both alike).
REST steps use aiohttp (one ``TCPConnector(limit=64)`` session, keep-alive,
pre-serialized ``{"instances": [one row]}`` bodies) at 64 connections against
the coalescing router's REST port and 5.  Each step: a 1 s warm-up, then
``--seconds`` measured.  Before each step one request is checked (output
names and shapes; values too, against the direct worker's, except for the
fixed reply); before the coalescing steps also a burst of the 16 distinct
requests at once, so merged batches must be split back to the right callers.

Prints one table (req/s, p50, p99, cores used by client / router / backend
during the measured window), the ratios against their targets, the
coalescing router's batch statistics (``/metrics`` deltas over each of its
concurrency-64 steps: rows and requests per batch, what closed the batches,
mean queue wait, and the router's own mean Predict latency beside the
client's), and as its last line the headline.  Progress goes to
stderr.  Exits 1 if any request failed.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import Counter
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.bench_router import (
    check_grpc_response,
    cpu_columns,
    failed,
    grpc_answer,
    grpc_phase,
    loop_name,
    print_errors,
    signed_ms,
    times,
)
from loadtest.bench_worker import input_sets, predict_requests
from loadtest.common import (
    GRPC_OPTIONS,
    ROOT,
    ListeningProcess,
    LoadResult,
    RouterProcess,
    WorkerProcess,
    bench_args,
    closed_loop,
    error_text,
    print_table,
    progress,
    ratio,
    run_async,
    start_worker,
)

MODEL_NAME = "ctr"
DEFAULT_CONFIG = ROOT / "configs" / "local.yaml"
WARMUP_S = 1.0
HIGH = 64  # concurrency of the throughput steps
# Targets of the acceptance criteria.
TARGET_VS_DIRECT = 2.5  # coalescing throughput / direct worker throughput, at least
TARGET_P99_VS_DIRECT = 0.5  # coalescing p99 / direct worker p99, below
TARGET_VS_CEILING = 0.7  # coalescing throughput / fixed-reply throughput, at least
TARGET_C1_P99_MS = 0.5  # c=1 p99 with coalescing - p99 without, at most
TARGET_REST = 2.0  # router REST throughput / inline aiohttp throughput, at least
TARGET_SPLIT = 0.95  # coalescing throughput with a 90/10 sticky split / without, at least
SPLIT_HEADER = "x-user-id"
SPLIT_KEYS = 10_000  # distinct sticky keys the clients cycle through


@dataclass
class Targets:
    coalescing: RouterProcess
    plain: RouterProcess  # --no-batching
    direct: WorkerProcess
    fixed: ListeningProcess
    inline: ListeningProcess
    split: RouterProcess  # coalescing, versions 1 and 2, a 90/10 split sticky by SPLIT_HEADER

    def all(self) -> list[Any]:
        return [self.coalescing, self.plain, self.direct, self.fixed, self.inline, self.split]


@dataclass
class BatchStats:
    """``/metrics`` deltas of the coalescing router over one step, and the client's view of it."""

    label: str
    batches: float
    rows: float
    requests: float
    triggers: dict[str, float]
    queue_wait_s: float  # summed over requests
    queued: float  # requests that went through the queue
    handled_s: float  # router-side request latency, summed
    handled: float  # requests the router answered
    client_mean_ms: float = float("nan")

    @property
    def mean_rows(self) -> float:
        return ratio(self.rows, self.batches)

    @property
    def mean_requests(self) -> float:
        return ratio(self.requests, self.batches)

    @property
    def queue_wait_ms(self) -> float:
        return 1000 * ratio(self.queue_wait_s, self.queued)

    @property
    def router_ms(self) -> float:
        return 1000 * ratio(self.handled_s, self.handled)


# -- start-up ---------------------------------------------------------------------


def router_config(model_dir: Path) -> dict[str, Any]:
    """The embedded default config, serving ``model_dir`` on free ports."""
    import yaml

    config = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    for model in config["models"]:
        if model["name"] == MODEL_NAME:
            model["base_path"] = str(model_dir)
    config.setdefault("grpc", {})["port"] = 0
    config.setdefault("rest", {})["port"] = 0
    return config


def split_config(model_dir: Path) -> dict[str, Any]:
    """The default config serving versions 1 and 2, 90/10, sticky by ``SPLIT_HEADER``."""
    config = router_config(model_dir)
    for model in config["models"]:
        if model["name"] == MODEL_NAME:
            model.update(version_policy="specific:1,2", version_labels={"stable": 1, "canary": 2},
                         routing={"split": {"stable": 90, "canary": 10}, "sticky_header": SPLIT_HEADER})
    return config


def start_all(model_dir: Path, started: list[Any]) -> Targets:
    """Starts every target (they load in parallel) and waits until all are up.

    Each process is appended to ``started`` as soon as it exists, so the
    caller can stop them whatever fails.
    """
    config = router_config(model_dir)
    progress("starting router with coalescing (default config) ...")
    started.append(RouterProcess(config))
    progress("starting router with --no-batching ...")
    started.append(RouterProcess(config, args=["--no-batching"]))
    progress("starting a worker to call directly ...")
    started.append(start_worker({MODEL_NAME: model_dir}))
    progress("starting fixed-reply gRPC server ...")
    started.append(ListeningProcess("loadtest.fixed_reply"))
    progress("starting inline aiohttp server (loads the model) ...")
    started.append(ListeningProcess("loadtest.inline_rest", ["--model-dir", str(model_dir)]))
    progress("starting router with a 90/10 sticky split between versions 1 and 2 ...")
    started.append(RouterProcess(split_config(model_dir)))
    targets = Targets(*started)
    workers = int(config.get("workers", {}).get("count", 2))  # 2: the config's own default
    for name, router in (("coalescing router", targets.coalescing), ("router without batching", targets.plain),
                         ("router with a split", targets.split)):
        ready = router.wait_ready(workers=workers)
        progress(f"{name} pid {router.pid} on {router.grpc_address} / {router.rest_url} ready ({ready:.1f}s), "
                 f"workers {router.worker_pids()}")
    ready = targets.direct.wait_serving()
    progress(f"direct worker pid {targets.direct.pid} on {targets.direct.address} SERVING ({ready:.1f}s)")
    progress(f"fixed-reply pid {targets.fixed.pid} on {targets.fixed.address}; "
             f"inline aiohttp pid {targets.inline.pid} on {targets.inline.url}")
    return targets


def router_pids(router: RouterProcess) -> dict[str, int | None]:
    pids: dict[str, int | None] = {"client": None, "router": router.pid}
    for i, pid in enumerate(router.worker_pids()):
        pids[f"w{i}"] = pid
    return pids


# -- checks -----------------------------------------------------------------------


async def grpc_burst_check(address: str, requests: Sequence[Any], expected: Sequence[Any]) -> None:
    """All ``requests`` at once (so the router may merge them); each answer must be its own."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        answers = await asyncio.gather(*(stub.Predict(r, timeout=30) for r in requests))
    for answer, expect in zip(answers, expected):
        check_grpc_response(answer, expect=expect)


def rest_bodies() -> list[bytes]:
    """``{"instances": [one row]}`` for each distinct input set, same inputs as the gRPC requests."""
    import orjson

    return [
        orjson.dumps({"instances": [{name: value[0].tolist() for name, value in inputs.items()}]})
        for inputs in input_sets(1)
    ]


def check_rest_answer(status: int, body: bytes, expect: Any) -> None:
    import numpy as np
    import orjson

    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    predictions = orjson.loads(body).get("predictions")
    if not isinstance(predictions, list) or len(predictions) != 1:
        raise RuntimeError(f"wrong answer: predictions {str(predictions)[:200]}, expected one row")
    row = predictions[0]
    if not isinstance(row, dict) or sorted(row) != ["logit", "probability"]:
        raise RuntimeError(f"wrong answer: row {str(row)[:200]}, expected logit and probability")
    if not np.allclose([row["probability"]], expect, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"wrong answer: probability {row['probability']}, expected {np.asarray(expect).tolist()}")


# -- REST load --------------------------------------------------------------------


async def rest_phase(
    url: str,
    bodies: Sequence[bytes],
    *,
    label: str,
    concurrency: int,
    seconds: float,
    cpu_pids: Mapping[str, int | None],
    expect: Any,
) -> LoadResult:
    """One checked request, then a closed loop of one-row predicts over ``concurrency`` keep-alive connections."""
    import aiohttp

    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            async with session.post(url, data=bodies[0], headers=headers) as resp:
                check_rest_answer(resp.status, await resp.read(), expect)
        except (aiohttp.ClientError, RuntimeError, ValueError) as exc:
            progress(f"  check failed: {error_text(exc)}")
            return failed(label, concurrency, exc)
        feeds = itertools.cycle(bodies)

        async def call() -> None:
            async with session.post(url, data=next(feeds), headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")

        return await closed_loop(call, concurrency=concurrency, seconds=seconds, warmup=WARMUP_S,
                                 label=label, cpu_pids=cpu_pids)


# -- batch statistics ---------------------------------------------------------------


def batch_counters(router: RouterProcess) -> dict[str, float]:
    """The model's coalescing counters in ``/metrics`` (sums, counts, triggers) and its Predict latency sums."""
    wanted = {
        "tfs_router_batch_size_rows_sum": "rows",
        "tfs_router_batch_size_rows_count": "batches",
        "tfs_router_batch_size_requests_sum": "requests",
        "tfs_router_batch_queue_wait_seconds_sum": "queue_wait_s",
        "tfs_router_batch_queue_wait_seconds_count": "queued",
    }
    out: dict[str, float] = {}
    for name, labels, value in router.metrics():
        if labels.get("model") != MODEL_NAME:
            continue
        if name in wanted:
            out[wanted[name]] = value
        elif name == "tfs_router_batches_total":
            out[f"trigger:{labels.get('trigger', '?')}"] = value
        elif name.startswith("tfs_router_request_latency_seconds_") and labels.get("api") == "Predict":
            # Both protocols: each step uses only one.
            key = "handled_s" if name.endswith("_sum") else "handled" if name.endswith("_count") else None
            if key is not None:
                out[key] = out.get(key, 0.0) + value
    return out


def batch_delta(label: str, before: Mapping[str, float], after: Mapping[str, float],
                result: LoadResult) -> BatchStats:
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    triggers = {k.split(":", 1)[1]: d(k) for k in after if k.startswith("trigger:") and d(k)}
    client_mean_ms = 1000 * sum(result.latencies) / len(result.latencies) if result.latencies else float("nan")
    return BatchStats(label, d("batches"), d("rows"), d("requests"), triggers, d("queue_wait_s"), d("queued"),
                      d("handled_s"), d("handled"), client_mean_ms)


# -- concurrency 1, interleaved ------------------------------------------------------

C1_ROUNDS = 10  # alternations of the two routers in the concurrency-1 comparison


def merged(label: str, parts: Sequence[LoadResult]) -> LoadResult:
    """One result from several short windows of the same target."""
    total = sum(p.seconds for p in parts)
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p.errors)
    keys = {k for p in parts for k in p.cpu}
    cpu = {k: sum(p.cpu.get(k, 0.0) * p.seconds for p in parts) / total for k in keys} if total else {}
    return LoadResult(label=label, concurrency=parts[0].concurrency, rows_per_call=1, seconds=total,
                      latencies=sorted(x for p in parts for x in p.latencies), errors=errors, cpu=cpu)


async def interleaved_c1(pair: Sequence[tuple[str, str, Mapping[str, int | None]]], requests: Sequence[Any],
                         expect: Any, seconds: float) -> list[LoadResult]:
    """Concurrency 1 on each target of ``pair`` in ``C1_ROUNDS`` alternating windows.

    A difference of a fraction of a millisecond is smaller than the drift of
    this machine over a few seconds (other processes, CPU frequency), so the
    two routers are measured turn about, ``seconds / C1_ROUNDS`` each, and
    each one's windows are pooled: drift then hits both alike.
    """
    import contextlib

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    feeds = itertools.cycle(requests)
    async with contextlib.AsyncExitStack() as stack:
        stubs = []
        for label, address, _ in pair:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address, options=GRPC_OPTIONS))
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                check_grpc_response(await stub.Predict(requests[0], timeout=30), expect=expect)
            except (grpc.RpcError, RuntimeError) as exc:
                progress(f"  check failed: {error_text(exc)}")
                return [failed(label, 1, exc) for label, _, _ in pair]
            stubs.append(stub)

        def caller(stub: Any) -> Any:
            async def call() -> None:
                await stub.Predict(next(feeds), timeout=30)
            return call

        for stub in stubs:  # warm-up, unmeasured
            await closed_loop(caller(stub), concurrency=1, seconds=WARMUP_S, warmup=0.0)
        parts: list[list[LoadResult]] = [[] for _ in pair]
        for _ in range(C1_ROUNDS):
            for (label, _, pids), stub, got in zip(pair, stubs, parts):
                got.append(await closed_loop(caller(stub), concurrency=1, seconds=seconds / C1_ROUNDS,
                                             warmup=0.0, label=label, cpu_pids=pids))
    return [merged(label, got) for (label, _, _), got in zip(pair, parts)]


async def interleaved_split(pair: Sequence[tuple[str, str, Mapping[str, int | None]]], requests: Sequence[Any],
                            seconds: float) -> list[LoadResult]:
    """Concurrency HIGH on three targets turn about (``C1_ROUNDS`` windows each, pooled).

    ``pair``: the router without routing, then the router with the 90/10
    sticky split, measured twice: once choosing versions itself from each
    request's sticky key (``SPLIT_HEADER``, cycling over ``SPLIT_KEYS``
    users), once with the same 90/10 of versions named by the client.  The
    first comparison is the whole cost of a canary (two versions' batches
    instead of one); the second, the cost of routing alone.
    """
    import contextlib

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from router.traffic import bucket

    feeds = itertools.cycle(requests)
    users = [f"user-{i}" for i in range(SPLIT_KEYS)]
    keys = itertools.cycle([((SPLIT_HEADER, u),) for u in users])
    named = []
    for u in users[:len(requests) * 50]:
        r = copy.deepcopy(requests[len(named) % len(requests)])
        r.model_spec.version.value = 2 if bucket(u) >= 90 else 1  # the router's own layout: v1 [0, 90), v2 [90, 100)
        named.append(r)
    named_feed = itertools.cycle(named)
    (plain_label, plain_address, plain_pids), (split_label, split_address, split_pids) = pair
    targets = [(plain_label, plain_address, plain_pids, "routed"), (split_label, split_address, split_pids, "routed"),
               ("coalescing, 90/10 named by clients", split_address, split_pids, "named")]
    seen: list[set[int]] = [set() for _ in targets]
    async with contextlib.AsyncExitStack() as stack:
        stubs = []
        for _, address, _, _ in targets:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address, options=GRPC_OPTIONS))
            stubs.append(prediction_service_pb2_grpc.PredictionServiceStub(channel))

        def caller(stub: Any, versions: set[int], how: str) -> Any:
            async def routed() -> None:
                resp = await stub.Predict(next(feeds), metadata=next(keys), timeout=30)
                versions.add(resp.model_spec.version.value)

            async def by_client() -> None:
                resp = await stub.Predict(next(named_feed), timeout=30)
                versions.add(resp.model_spec.version.value)
            return routed if how == "routed" else by_client

        for stub, versions, (_, _, _, how) in zip(stubs, seen, targets):  # warm-up, unmeasured
            await closed_loop(caller(stub, versions, how), concurrency=HIGH, seconds=WARMUP_S, warmup=0.0)
        parts: list[list[LoadResult]] = [[] for _ in targets]
        for _ in range(C1_ROUNDS):
            for (label, _, pids, how), stub, versions, got in zip(targets, stubs, seen, parts):
                got.append(await closed_loop(caller(stub, versions, how), concurrency=HIGH,
                                             seconds=seconds / C1_ROUNDS, warmup=0.0, label=label, cpu_pids=pids))
    progress("  versions that answered: " + ", ".join(f"{t[0]} {sorted(v)}" for t, v in zip(targets, seen)))
    if seen[1] != {1, 2} or seen[2] != {1, 2}:
        raise RuntimeError(f"the split router answered with versions {sorted(seen[1])}, expected 1 and 2")
    return [merged(t[0], got) for t, got in zip(targets, parts)]


# -- the benchmark ----------------------------------------------------------------


async def measure(t: Targets, seconds: float) -> tuple[list[LoadResult], list[BatchStats]]:
    requests = predict_requests(1)
    bodies = rest_bodies()
    progress("reference answers from the direct worker ...")
    expected = [await grpc_answer(t.direct.address, r) for r in requests]
    co_pids, plain_pids = router_pids(t.coalescing), router_pids(t.plain)
    grpc_steps = [
        ("coalescing", t.coalescing.grpc_address, co_pids, HIGH),
        ("no coalescing", t.plain.grpc_address, plain_pids, HIGH),
        ("direct worker", t.direct.address, {"client": None, "worker": t.direct.pid}, HIGH),
        ("fixed reply", t.fixed.address, {"client": None, "server": t.fixed.pid}, HIGH),
    ]
    c1_pair = [("coalescing", t.coalescing.grpc_address, co_pids),
               ("no coalescing", t.plain.grpc_address, plain_pids)]
    rest_steps = [
        ("REST coalescing", f"{t.coalescing.rest_url}/v1/models/{MODEL_NAME}:predict", co_pids),
        ("REST inline aiohttp", f"{t.inline.url}/v1/models/{MODEL_NAME}:predict",
         {"client": None, "server": t.inline.pid}),
    ]
    split_pair = [("coalescing, no routing", t.coalescing.grpc_address, co_pids),
                  ("coalescing, 90/10 split", t.split.grpc_address, router_pids(t.split))]
    steps = len(grpc_steps) + 2 + len(rest_steps)
    results: list[LoadResult] = []
    stats: list[BatchStats] = []
    step = 0

    def announce(label: str, concurrency: int) -> None:
        progress(f"[{step}/{steps}] {label} concurrency {concurrency} ({WARMUP_S:g}s warm-up + {seconds:g}s) ...")

    def done(r: LoadResult) -> None:
        progress(f"  {r.rate:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, {r.error_count} errors")
        results.append(r)

    for label, address, pids, concurrency in grpc_steps:
        step += 1
        announce(f"gRPC {label}", concurrency)
        coalescing = address == t.coalescing.grpc_address
        if coalescing:
            try:
                await grpc_burst_check(address, requests, expected)
            except Exception as exc:  # noqa: BLE001 - reported as the step's error
                progress(f"  burst check failed: {error_text(exc)}")
                done(failed(label, concurrency, exc))
                continue
        before = batch_counters(t.coalescing) if coalescing and concurrency == HIGH else None
        # The fixed reply is the same bytes for every input: names and shapes only.
        expect = None if address == t.fixed.address else expected[0]
        done(await grpc_phase(address, requests, label=label, concurrency=concurrency, seconds=seconds,
                              cpu_pids=pids, expect=expect))
        if before is not None:
            stats.append(batch_delta(f"gRPC c={concurrency}", before, batch_counters(t.coalescing), results[-1]))

    step += 1
    progress(f"[{step}/{steps}] gRPC coalescing and no coalescing, concurrency 1, turn about "
             f"({C1_ROUNDS} x {seconds / C1_ROUNDS:g}s each) ...")
    for r in await interleaved_c1(c1_pair, requests, expected[0], seconds):
        done(r)

    step += 1
    progress(f"[{step}/{steps}] gRPC coalescing with and without a 90/10 sticky split, concurrency {HIGH}, "
             f"turn about ({C1_ROUNDS} x {seconds / C1_ROUNDS:g}s each) ...")
    for r in await interleaved_split(split_pair, requests, seconds):
        done(r)

    for label, url, pids in rest_steps:
        step += 1
        announce(label, HIGH)
        coalescing = url.startswith(t.coalescing.rest_url)
        before = batch_counters(t.coalescing) if coalescing else None
        done(await rest_phase(url, bodies, label=label, concurrency=HIGH, seconds=seconds, cpu_pids=pids,
                              expect=expected[0]))
        if before is not None:
            stats.append(batch_delta(f"REST c={HIGH}", before, batch_counters(t.coalescing), results[-1]))
    return results, stats


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(results: Sequence[LoadResult], stats: Sequence[BatchStats], config: Mapping[str, Any],
           seconds: float) -> str:
    batching = config["models"][0].get("batching", {})
    workers = config.get("workers", {})
    print(f"model {MODEL_NAME}; {os.cpu_count()} CPUs; {seconds:g}s per step after {WARMUP_S:g}s warm-up; "
          f"client on {loop_name()}, batch-1 requests")
    print(f"routers: {workers.get('count')} workers (max_inflight {workers.get('max_inflight')}); coalescing: "
          + ", ".join(f"{k} {v}" for k, v in batching.items() if k != "enabled")
          + "; direct worker: default flags")
    headers = ["target", "api", "conc", "calls", "req/s", "p50 ms", "p99 ms", "errors",
               "client cpu", "router cpu", "backend cpu", "total cpu"]
    rows = [[r.label.removeprefix("REST "), "rest" if r.label.startswith("REST") else "grpc", r.concurrency,
             r.calls, r.rate, r.p50_ms, r.p99_ms, r.error_count, *cpu_columns(r)] for r in results]
    print_table(headers, rows)
    print("(cpu columns: cores used during the measured window; backend: the router's workers, the direct "
          "worker, or the fixed-reply / inline server)")
    for r in results:
        if r.cpu:
            detail = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu.items())
            print(f"  cpu {r.label} c={r.concurrency}: {detail}")
    print_errors(results)

    by = {(r.label, r.concurrency): r for r in results}
    co, plain = by["coalescing", HIGH], by["no coalescing", HIGH]
    direct, fixed = by["direct worker", HIGH], by["fixed reply", HIGH]
    co1, plain1 = by["coalescing", 1], by["no coalescing", 1]
    rest_co, rest_inline = by["REST coalescing", HIGH], by["REST inline aiohttp", HIGH]
    vs_direct = ratio(co.rate, direct.rate)
    p99_vs_direct = ratio(co.p99_ms, direct.p99_ms)
    vs_ceiling = ratio(co.rate, fixed.rate)
    c1_p99 = co1.p99_ms - plain1.p99_ms
    vs_inline = ratio(rest_co.rate, rest_inline.rate)
    unrouted, split = by["coalescing, no routing", HIGH], by["coalescing, 90/10 split", HIGH]
    named = by["coalescing, 90/10 named by clients", HIGH]
    vs_split = ratio(split.rate, unrouted.rate)
    vs_named = ratio(split.rate, named.rate)
    print("ratios:")
    print(f"  gRPC c={HIGH} throughput, coalescing / direct worker: {times(vs_direct)} "
          f"(target >= {TARGET_VS_DIRECT}x) {verdict(vs_direct >= TARGET_VS_DIRECT)}")
    print(f"  gRPC c={HIGH} p99, coalescing / direct worker: {times(p99_vs_direct)} "
          f"(target < {TARGET_P99_VS_DIRECT}x) {verdict(p99_vs_direct < TARGET_P99_VS_DIRECT)}")
    print(f"  gRPC c={HIGH} throughput, coalescing / fixed reply: {vs_ceiling:.2f} "
          f"(target >= {TARGET_VS_CEILING}) {verdict(vs_ceiling >= TARGET_VS_CEILING)}")
    print(f"  gRPC c={HIGH} throughput, coalescing / no coalescing: {times(ratio(co.rate, plain.rate))}")
    print(f"  gRPC c=1 p99, coalescing - no coalescing: {signed_ms(c1_p99)} "
          f"(target <= +{TARGET_C1_P99_MS} ms) {verdict(c1_p99 <= TARGET_C1_P99_MS)}")
    print(f"  REST c={HIGH} throughput, router / inline aiohttp: {times(vs_inline)} "
          f"(target >= {TARGET_REST}x) {verdict(vs_inline >= TARGET_REST)}")
    print(f"  gRPC c={HIGH} throughput, with a 90/10 sticky split / without (turn about): {vs_split:.3f} "
          f"(target >= {TARGET_SPLIT}) {verdict(vs_split >= TARGET_SPLIT)}")
    print(f"  gRPC c={HIGH} throughput, 90/10 chosen by the router / the same 90/10 named by clients: "
          f"{vs_named:.3f} (the cost of routing alone; target >= {TARGET_SPLIT}) {verdict(vs_named >= TARGET_SPLIT)}")

    print("coalescing router batches (from /metrics, over each step):")
    print_table(["step", "batches", "rows/batch", "requests/batch", "closed by", "queue wait ms",
                 "router ms", "client ms"],
                [[s.label, int(s.batches), s.mean_rows, s.mean_requests,
                  ", ".join(f"{k} {int(v)}" for k, v in sorted(s.triggers.items())) or "-",
                  s.queue_wait_ms, s.router_ms, s.client_mean_ms] for s in stats])
    print("(means per request: queue wait in the batch queue; router: from the handler's start to its answer; "
          "client: the whole call; client - router is time spent outside the router's handler)")
    return (f"coalescing: {times(vs_direct)} direct worker throughput, p99 {times(p99_vs_direct)}; "
            f"{vs_ceiling:.2f} of fixed-reply ceiling; REST {times(vs_inline)} inline aiohttp; "
            f"c=1 p99 {signed_ms(c1_p99)} vs no coalescing; 90/10 sticky split {split.rate:,.0f} req/s vs "
            f"{unrouted.rate:,.0f} without ({vs_split:.3f}) and {named.rate:,.0f} with versions named by "
            f"clients ({vs_named:.3f})")


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_args("python -m loadtest.bench_batching", __doc__, argv)  # fails early without `make demo`
    model_dir = args.model_dir
    started: list[Any] = []
    try:
        targets = start_all(model_dir, started)
        results, stats = run_async(measure(targets, args.seconds))
    finally:
        for proc in reversed(started):
            progress(stop_text(proc))
    headline = report(results, stats, router_config(model_dir), args.seconds)
    print(headline)
    return 1 if any(r.error_count for r in results) else 0


def stop_text(proc: Any) -> str:
    if isinstance(proc, WorkerProcess):
        return proc.stop("direct worker")
    return proc.stop()


if __name__ == "__main__":
    sys.exit(main())
